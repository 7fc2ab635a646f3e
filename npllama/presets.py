"""`python -m npllama.presets` (the console script `npllama-presets`): every preset of
npllama.model with its shape and parameter count; the 7B preset has 6,738,415,616 parameters,
the paper's 6.7B."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from .cli import OneLineParser, command
from .model import PRESETS, LlamaConfig


def describe_presets(presets: Mapping[str, LlamaConfig] = PRESETS) -> str:
    """A table of the presets (npllama.model's, unless given): a row each, with its shape and
    parameter count, in billions (one decimal) from 10^9 parameters, else in millions (two)."""
    lines = [f"{'preset':<7} {'dim':>5} {'layers':>6} {'heads':>5} {'ffn':>6} {'vocab':>6}  params"]
    for name, c in presets.items():
        count = c.n_params()
        human = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"
        lines.append(f"{name:<7} {c.dim:>5} {c.n_layers:>6} {c.n_heads:>5} {c.ffn_dim:>6} {c.vocab_size:>6}  "
                     f"{human} ({count:,})")
    return "\n".join(lines)


@command
def main(argv=None) -> int:
    OneLineParser(prog="python -m npllama.presets",
                  description="Print every preset: its shape and parameter count.").parse_args(argv)
    print(describe_presets())
    return 0


if __name__ == "__main__":
    sys.exit(main())
