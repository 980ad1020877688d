# Stub of the compiled reader (schemas/_flat_avro.c).
from typing import Any

VERSION: int

def read(data: bytes, offset: int, names: tuple[str, ...], kinds: tuple[int, ...], /) -> tuple[dict[str, Any], int]: ...
