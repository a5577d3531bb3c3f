"""The cffi declarations of a native header, read from the header itself, so
that each struct, constant and prototype the Python side uses is typed once
(the *_build.py scripts pass the result to FFI.cdef).

A header marks what cffi sees with the lines `/* cdef: begin */` and
`/* cdef: end */` (any number of such sections). Inside them, as cffi cannot
run the preprocessor:
- `#define NAME value` becomes `#define NAME ...`: the compiler supplies the
  value, so the macro may be any integer expression;
- an array bound that is a name, `[NAME]`, becomes `[...]`: the compiler
  supplies the length;
- `static` and `static inline` are dropped from prototypes (cffi calls a
  static function of the module's source through the wrapper it generates);
- every other preprocessor line is dropped.
Function bodies stay outside the sections.
"""
from __future__ import annotations

import os
import re

BEGIN = "/* cdef: begin */"
END = "/* cdef: end */"

_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Za-z_]\w*)(\s+.*)?$")
_BOUND = re.compile(r"\[\s*[A-Za-z_]\w*\s*\]")
_STATIC = re.compile(r"^(\s*)static\s+(inline\s+)?")


def cdef_sections(path: str) -> str:
    """The cdef text of the header at `path`."""
    out: list[str] = []
    inside = False
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{path}:{n}: nested {BEGIN}")
            inside = True
            continue
        if stripped == END:
            if not inside:
                raise ValueError(f"{path}:{n}: {END} without {BEGIN}")
            inside = False
            continue
        if not inside:
            continue
        if stripped.startswith("#"):
            m = _DEFINE.match(line)
            if m and m.group(2):  # object-like (a function-like macro does not match)
                out.append(f"#define {m.group(1)} ...")
            continue
        line = _STATIC.sub(r"\1", line)
        out.append(_BOUND.sub("[...]", line))
    if inside:
        raise ValueError(f"{path}: {BEGIN} never ended")
    return "\n".join(out) + "\n"


def cdef(here: str, *headers: str) -> str:
    """The cdef text of several headers of directory `here`, in order."""
    return "".join(cdef_sections(os.path.join(here, h)) for h in headers)
