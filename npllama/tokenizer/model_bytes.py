"""Reading a serialized SentencePiece model without SentencePiece's protobuf module: the top-level
field walk that refuses truncated or foreign bytes before SentencePiece parses them, and the
fragment that turns off the dummy-prefix space.

Why these two pieces of protobuf by hand rather than SentencePiece's own API: SentencePiece 0.2.1
had `SentencePieceProcessor.OverrideNormalizerSpec(add_dummy_prefix=False)`, but 0.2.3, the
current release, rewrote its bindings without it; and its ModelProto module
(`sentencepiece_model_pb2`) needs the `protobuf` package at the very major version it was
generated with (7.x for 0.2.3), which would pin the protobuf of every environment npllama is
installed into. Both pieces work the same with every SentencePiece 0.2.x, and
tests/test_tokenizer.py checks them against SentencePiece's behaviour (truncated models refused;
encoding after U+2581 without the prefix).
"""

from __future__ import annotations

import sentencepiece

from ..errors import NpllamaError

# Meta's tokenizer.model is 0.5 MB and a 256k-piece model about 4 MB; a "model" of more than this
# is not one, and reading it whole (a device, a growing file) must not take the machine's memory.
MAX_MODEL_BYTES = 64 * 2**20

# A serialized ModelProto fragment: normalizer_spec (field 3) { add_dummy_prefix (field 3): false }.
# A protobuf parser merges a message field that appears twice, the later values winning, so
# appending this to a model's bytes gives the same model without the dummy prefix space.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_NORMALIZER_SPEC_FIELD = 3


class TokenizerError(NpllamaError):
    """A tokenizer file or argument that cannot be used; the message says what to do."""



def processor_from_bytes(model_bytes: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    """A SentencePieceProcessor for `model_bytes`, or a TokenizerError naming `source`."""
    fix = "it should be a SentencePiece .model file; copy or train it again"
    if not model_bytes:
        raise TokenizerError(f"{source} is empty; {fix}")
    try:
        fields = protobuf_field_numbers(model_bytes)
    except ValueError:
        raise TokenizerError(f"{source} is not a SentencePiece model (truncated or corrupted); "
                             f"{fix}") from None
    # Without its normalizer_spec, a cut-off model still loads, but with SentencePiece's default
    # normalization (extra whitespace removed): a different tokenizer. Every trained model has one.
    if _NORMALIZER_SPEC_FIELD not in fields:
        raise TokenizerError(f"{source} has no normalizer_spec, so it is truncated or not a "
                             f"SentencePiece model; {fix}")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError, ValueError) as error:  # ValueError: an undecodable message
        detail = " ".join(str(error).split()) or "it does not parse"
        raise TokenizerError(f"{source} is not a valid SentencePiece model ({detail}); {fix}") from None
    if processor.vocab_size() == 0:
        raise TokenizerError(f"{source} has no pieces; {fix}")
    return processor


def protobuf_field_numbers(data: bytes) -> set[int]:
    """Field numbers at the top level of a serialized protocol buffer message.

    Walks the wire format (https://protobuf.dev/programming-guides/encoding/) without decoding the
    values; raises ValueError where the data ends in the middle of a field or is not protobuf.
    """

    def varint(position):
        value, shift = 0, 0
        while True:
            if position >= len(data) or shift > 63:
                raise ValueError("data ends inside a varint")
            byte = data[position]
            value |= (byte & 0x7F) << shift
            position, shift = position + 1, shift + 7
            if not byte & 0x80:
                return value, position

    fixed_sizes = {1: 8, 5: 4}  # wire types 1 (64-bit) and 5 (32-bit)
    numbers, position = set(), 0
    while position < len(data):
        key, position = varint(position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            _, position = varint(position)
        elif wire_type == 2:
            length, position = varint(position)
            position += length
        elif wire_type in fixed_sizes:
            position += fixed_sizes[wire_type]
        else:
            raise ValueError(f"wire type {wire_type}")
        if position > len(data):
            raise ValueError("data ends inside a field")
        numbers.add(number)
    return numbers
