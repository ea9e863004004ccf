"""Regular expressions checked as HAProxy compiles them: by the PCRE2 library it is linked with, not Python's `re`.

The two dialects disagree both ways: Python takes `\\u0041`, `\\N{DIGIT ONE}` and a back-reference to an unnamed
group, PCRE2 refuses them (and HAProxy compiles ACL patterns with PCRE2_NO_AUTO_CAPTURE, so `(a)\\1` refers to
nothing there); a pattern that checks out alone can also break once wrapped to match the whole value (`(?x)/a#`:
the comment swallows the closing `)$`). A config whose regex `haproxy -c` refuses would block every HTTP change,
so `lbagent check` compiles each one here, exactly as it is written into haproxy.cfg.

Why ctypes and not a PyPI binding (pcre2, pypcre): those bundle a PCRE2 of their own, of another version and build,
and what matters is the answer of the very library HAProxy loads. Debian's haproxy is linked with libpcre2-8.so.0
(`ldd /usr/sbin/haproxy`); ctypes loads the same file through the same dynamic loader, with no compiled extension to
build. Debian's libpcre2-8-0 is on every Debian 12 machine: grep (Priority: required) pre-depends on it, and haproxy
depends on it.

HAProxy's regex_comp() (src/regex.c, 2.6) calls pcre2_compile() with PCRE2_NO_AUTO_CAPTURE (no capture wanted, as
for ACLs) and PCRE2_CASELESS for `-i`, then pcre2_jit_compile(PCRE2_JIT_COMPLETE) since Debian builds it with
USE_PCRE2_JIT; a JIT failure other than PCRE2_ERROR_JIT_BADOPTION refuses the config too. So does check().

Matching costs: HAProxy calls pcre2_match() without a match context, so PCRE2's default match limit (10,000,000)
applies: a pathological pattern such as `(.*a){20}` fails to match (the route is not taken) once it reaches the
limit, after about 15 ms of one core here with JIT. lbagent leaves that limit alone; see docs/configuration.md.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

from lbagent.routing import whole_value

LIBRARY = "libpcre2-8.so.0"
PACKAGE = "libpcre2-8-0"

# pcre2.h (10.42, the same in every PCRE2 10.x)
CASELESS = 0x00000008
NO_AUTO_CAPTURE = 0x00002000
JIT_COMPLETE = 0x00000001
ERROR_JIT_BADOPTION = -45
ERROR_NOMATCH = -1
ERROR_MATCHLIMIT = -47
_MESSAGE_BYTES = 256  # as HAProxy's own buffer


class Pcre2Error(ValueError):
    """PCRE2 refuses a pattern: its message, and the offset (in the pattern as given) where it stopped."""

    def __init__(self, message: str, offset: int | None) -> None:
        super().__init__(message if offset is None else f"{message} at offset {offset}")
        self.message = message
        self.offset = offset


@dataclass(frozen=True)
class _Library:
    handle: ctypes.CDLL

    def compile(self, pattern: bytes, options: int) -> tuple[int | None, int, int]:
        """(code or None, error code, error offset)."""
        error, offset = ctypes.c_int(0), ctypes.c_size_t(0)
        code = self.handle.pcre2_compile_8(pattern, len(pattern), options, ctypes.byref(error), ctypes.byref(offset),
                                           None)
        return code, error.value, offset.value

    def message(self, error: int) -> str:
        buffer = ctypes.create_string_buffer(_MESSAGE_BYTES)
        if self.handle.pcre2_get_error_message_8(error, buffer, _MESSAGE_BYTES) < 0:
            return f"PCRE2 error {error}"
        return buffer.value.decode("ascii", "replace")


@cache
def _library() -> _Library:
    """The library, its functions typed. OSError when it cannot be loaded."""
    handle = ctypes.CDLL(LIBRARY)
    handle.pcre2_compile_8.restype = ctypes.c_void_p
    handle.pcre2_compile_8.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32,
                                       ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
    handle.pcre2_get_error_message_8.restype = ctypes.c_int
    handle.pcre2_get_error_message_8.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    handle.pcre2_jit_compile_8.restype = ctypes.c_int
    handle.pcre2_jit_compile_8.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    handle.pcre2_code_free_8.restype = None
    handle.pcre2_code_free_8.argtypes = [ctypes.c_void_p]
    handle.pcre2_match_data_create_from_pattern_8.restype = ctypes.c_void_p
    handle.pcre2_match_data_create_from_pattern_8.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    handle.pcre2_match_data_free_8.restype = None
    handle.pcre2_match_data_free_8.argtypes = [ctypes.c_void_p]
    handle.pcre2_match_8.restype = ctypes.c_int
    handle.pcre2_match_8.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                     ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
    return _Library(handle)


def available() -> str | None:
    """None when the library loads, else why not (for a message that names the Debian package)."""
    try:
        _library()
    except OSError as exc:
        return f"cannot load {LIBRARY} (Debian package {PACKAGE}): {exc}"
    return None


def _compiled(pattern: str, options: int, jit: bool) -> None:
    """Compile as HAProxy does, free, and raise Pcre2Error if PCRE2 refuses."""
    lib = _library()
    code, error, offset = lib.compile(pattern.encode("utf-8"), options)
    if not code:
        raise Pcre2Error(lib.message(error), offset)
    try:
        if jit:
            status = lib.handle.pcre2_jit_compile_8(code, JIT_COMPLETE)
            if status not in (0, ERROR_JIT_BADOPTION):
                raise Pcre2Error(f"its JIT compilation fails ({lib.message(status)})", None)
    finally:
        lib.handle.pcre2_code_free_8(code)


def check(pattern: str, caseless: bool = False) -> None:
    """Raise Pcre2Error unless HAProxy takes `pattern` as a whole-value match (`-m reg`, `-i` when `caseless`)
    meaning what it says: it must compile alone (so wrapping it cannot change its meaning: `a)|(b` is refused,
    although `^(?:a)|(b)$` compiles) and as written (whole_value()), JIT included. OSError: no library."""
    options = NO_AUTO_CAPTURE | (CASELESS if caseless else 0)
    _compiled(pattern, options, jit=False)
    written = whole_value(pattern)
    try:
        _compiled(written, options, jit=True)
    except Pcre2Error as exc:
        where = "" if exc.offset is None else f" at offset {exc.offset}"
        raise Pcre2Error(f"{exc.message}{where} of {written!r}, the whole-value match HAProxy is given",
                         None) from None


def check_raw(pattern: str, caseless: bool = False) -> None:
    """Raise Pcre2Error unless HAProxy takes `pattern` as written (the renderer's own constant regexes)."""
    _compiled(pattern, NO_AUTO_CAPTURE | (CASELESS if caseless else 0), jit=True)


def check_capturing(pattern: str) -> None:
    """Raise Pcre2Error unless HAProxy takes `pattern` as a regex whose groups the replacement names
    (`http-request replace-path`: compiled as written, groups captured)."""
    _compiled(pattern, 0, jit=True)


def matches(pattern: str, subject: str, caseless: bool = False) -> int:
    """pcre2_match()'s result as HAProxy gets it for a whole-value pattern (no match context: PCRE2's default
    limits): > 0 a match, ERROR_NOMATCH none, ERROR_MATCHLIMIT the limit reached (HAProxy: no match)."""
    lib = _library()
    code, error, offset = lib.compile(whole_value(pattern).encode("utf-8"),
                                      NO_AUTO_CAPTURE | (CASELESS if caseless else 0))
    if not code:
        raise Pcre2Error(lib.message(error), offset)
    data = None
    try:
        lib.handle.pcre2_jit_compile_8(code, JIT_COMPLETE)
        data = lib.handle.pcre2_match_data_create_from_pattern_8(code, None)
        text = subject.encode("utf-8")
        return int(lib.handle.pcre2_match_8(code, text, len(text), 0, 0, data, None))
    finally:
        if data:
            lib.handle.pcre2_match_data_free_8(data)
        lib.handle.pcre2_code_free_8(code)
