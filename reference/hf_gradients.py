"""Transformers' gradients in the format `python -m npllama.audit compare` reads: the worked example
of auditing another implementation (here Hugging Face's LlamaForCausalLM) against npllama.

    python reference/hf_gradients.py MODEL_DIR --batch batch.npy --out theirs.safetensors [--dtype float32]
    python -m npllama.audit compare MODEL_DIR --batch batch.npy --grads theirs.safetensors

A GGUF file is read by transformers too (`--gguf-file NAME` inside MODEL_DIR, dequantized):

    python reference/hf_gradients.py FOLDER --gguf-file model.gguf --batch batch.npy --out theirs.safetensors
    python -m npllama.audit compare FOLDER/model.gguf --batch batch.npy --grads theirs.safetensors

The batch holds token ids (B, T + 1): the model reads the first T, and the loss is the mean
cross-entropy of predicting the last T. Written out: every parameter's gradient under its
Hugging Face name, `loss`, and `hidden_states.0` .. `hidden_states.L` as output_hidden_states
gives them. Do the same from any other implementation and npllama audits it.
"""

from __future__ import annotations

import argparse
import sys

import numpy


def hf_gradients(model, batch: numpy.ndarray) -> dict:
    """{name: gradient, "loss": scalar, "hidden_states.i": (B, T, C)} as NumPy arrays, from `model`."""
    import torch
    import torch.nn.functional as F

    tokens = torch.from_numpy(batch[:, :-1].astype(numpy.int64))
    targets = torch.from_numpy(batch[:, 1:].astype(numpy.int64))
    model.zero_grad(set_to_none=True)
    output = model(input_ids=tokens, output_hidden_states=True)
    logits = output.logits if output.logits.dtype == torch.float64 else output.logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    tensors = {name: p.grad.detach().double().numpy() for name, p in model.named_parameters()}
    tensors["loss"] = numpy.asarray(loss.item(), dtype=numpy.float64)
    tensors.update({f"hidden_states.{i}": h.detach().double().numpy() for i, h in enumerate(output.hidden_states)})
    return tensors


def main(argv=None) -> int:
    import torch
    import transformers
    from safetensors.numpy import save_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch", required=True, help="token ids (B, T + 1) as .npy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside MODEL, which transformers dequantizes")
    args = parser.parse_args(argv)
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                          gguf_file=args.gguf_file).eval()
    tensors = hf_gradients(model, numpy.load(args.batch))
    save_file({name: numpy.ascontiguousarray(t) for name, t in tensors.items()}, args.out)
    print(f"wrote {args.out}: loss {float(tensors['loss']):.10f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
