"""Types of the compiled helpers (data_prep/_native.c)."""

from typing import Any

def classes(text: str, /) -> bytes: ...
def match(
    text: str,
    hay: str,
    classes: Any,
    lead: Any,
    starts: Any,
    widths: int,
    length_key: Any,
    bounds: Any,
    hash: Any,
    hash_sample: Any,
    stride: int,
    filter: Any,
    shift: int,
    key_off: Any,
    key_blob: Any,
    /,
) -> bytes: ...
def equal_range(keys: Any, sample: Any, stride: int, needles: Any, /) -> tuple[bytes, bytes]: ...
def sentences(code_points: Any, classes: Any, offsets: Any, /) -> tuple[bytes, bytes]: ...
