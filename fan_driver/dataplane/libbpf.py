"""libbpf (Debian's libbpf1) through ctypes: open an ELF object from memory, set
its read-only globals, load it, and take its programs' and maps' fds by name.

libbpf's messages (a verifier rejection's log among them) go to a print
callback that keeps them, so that a failed load says why.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Dict, List

from ..errors import FanError

LIBRARY = "libbpf.so.1"
PACKAGE = "libbpf1"   # Debian's and Ubuntu's name for it
LIBBPF_INFO = 1       # enum libbpf_print_level: WARN, INFO, DEBUG
LOG_TAIL = 40         # lines of the log an error keeps: the verifier's reason is last
_PRINT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_messages: List[str] = []
_lib = None
# a verifier log comes in one message, and can be long
_render = ctypes.create_string_buffer(1 << 20)


def _print(level: int, fmt: bytes, args: int) -> int:
    """libbpf's messages are printf formats with a va_list: vsnprintf renders them."""
    if level <= LIBBPF_INFO:
        _libc.vsnprintf(_render, len(_render), fmt, ctypes.c_void_p(args))
        _messages.append(_render.value.decode(errors="replace"))
    return 0


_libc = ctypes.CDLL(None)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_print_callback = _PRINT(_print)   # kept: libbpf holds only the pointer


def _signatures(lib) -> None:
    p, i, u32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
    for name, res, args in (
            ("libbpf_set_print", p, [_PRINT]),
            ("bpf_object__open_mem", p, [p, sz, p]),
            ("libbpf_get_error", ctypes.c_long, [p]),
            ("bpf_object__load", i, [p]), ("bpf_object__close", None, [p]),
            ("bpf_object__find_program_by_name", p, [p, ctypes.c_char_p]),
            ("bpf_object__find_map_by_name", p, [p, ctypes.c_char_p]),
            ("bpf_program__fd", i, [p]), ("bpf_map__fd", i, [p]),
            ("bpf_map__value_size", u32, [p]),
            ("bpf_map__set_initial_value", i, [p, p, sz]),
            ("bpf_map__set_max_entries", i, [p, u32]),
            ("bpf_map_update_elem", i, [i, p, p, ctypes.c_uint64]),
            ("bpf_map_delete_elem", i, [i, p])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def library():
    """The loaded libbpf, or FanError saying which package brings it."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as exc:
            raise FanError(f"{LIBRARY} cannot be loaded ({exc}): install the "
                           f"{PACKAGE} package") from exc
        _signatures(lib)
        lib.libbpf_set_print(_print_callback)
        _lib = lib
    return _lib


def _failed(what: str, code: int) -> FanError:
    code = abs(code)
    lines = "".join(_messages).splitlines()
    said = "\n".join(line for line in lines[-LOG_TAIL:] if line.strip())
    _messages.clear()
    return FanError(f"{what} failed: {os.strerror(code)} (errno {code})"
                    + (f"; libbpf and verifier log:\n{said}" if said else ""))


class BpfObject:
    """One loaded ELF object. `globals_` sets the .rodata map (the const
    volatile globals) byte for byte; `max_entries` sizes maps by name."""

    def __init__(self, elf: bytes, name: str, globals_: bytes,
                 max_entries: Dict[str, int] | None = None):
        lib = library()
        self._image = ctypes.create_string_buffer(elf, len(elf))   # libbpf keeps pointers in
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), object_name=name.encode())
        _messages.clear()
        obj = lib.bpf_object__open_mem(self._image, len(elf), ctypes.byref(opts))
        if not obj or lib.libbpf_get_error(obj):
            raise _failed(f"opening eBPF object {name!r}",
                          lib.libbpf_get_error(obj) if obj else errno.EINVAL)
        self._obj = obj
        try:
            self._configure(globals_, max_entries or {})
            err = lib.bpf_object__load(obj)
            if err:
                raise _failed(f"loading eBPF object {name!r}", err)
        except BaseException:
            self.close()
            raise
        _messages.clear()

    def _configure(self, globals_: bytes, max_entries: Dict[str, int]) -> None:
        lib = library()
        rodata = self._map(".rodata")
        size = lib.bpf_map__value_size(rodata)
        if size != len(globals_):
            raise FanError(f"eBPF object's .rodata holds {size} bytes, the loader packs "
                           f"{len(globals_)}: object and loader are out of step")
        self._globals = ctypes.create_string_buffer(globals_, len(globals_))
        err = lib.bpf_map__set_initial_value(rodata, self._globals, len(globals_))
        if err:
            raise _failed("setting the eBPF object's globals", err)
        for name, count in max_entries.items():
            err = lib.bpf_map__set_max_entries(self._map(name), count)
            if err:
                raise _failed(f"sizing eBPF map {name!r}", err)

    def _map(self, name: str) -> int:
        found = library().bpf_object__find_map_by_name(self._obj, name.encode())
        if not found:
            raise FanError(f"eBPF object has no map {name!r}")
        return found

    def program_fd(self, name: str) -> int:
        prog = library().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise FanError(f"eBPF object has no program {name!r}")
        return library().bpf_program__fd(prog)

    def map_fd(self, name: str) -> int:
        return library().bpf_map__fd(self._map(name))

    def close(self) -> None:
        """Closes its fds: attached tc filters keep the programs (and their maps)."""
        if self._obj:
            library().bpf_object__close(self._obj)
            self._obj = None


class _OpenOpts(ctypes.Structure):
    """The head of struct bpf_object_open_opts; libbpf reads only `sz` bytes."""
    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p)]


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    err = library().bpf_map_update_elem(map_fd, key, value, 0)
    if err:
        raise _failed("updating an eBPF map", err)


def map_delete(map_fd: int, key: bytes) -> None:
    """Delete a key; one that is not there is already deleted."""
    err = library().bpf_map_delete_elem(map_fd, key)
    if err and err != -errno.ENOENT:
        raise _failed("deleting from an eBPF map", err)
