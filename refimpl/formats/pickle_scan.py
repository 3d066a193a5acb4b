"""A state-dict pickle checked opcode by opcode, by its structure, before pickle runs any of it.

pickle.Unpickler builds whatever a stream describes: a tuple nested a million deep (hashing it overflows the C
stack), or, from a few hundred bytes of shared references (GET, DUP), a tuple whose hash and text are exponentially
long. So data.pkl is first walked opcode by opcode (with pickletools' table of opcodes and argument readers) on an
abstract stack that knows the few shapes torch.save writes (protocol 2; protocol 4's opcodes for them too):

  the state dict     OrderedDict() or {}, SETITEM(S) with str keys; then BUILD of {'_metadata': {...}} on it
  a tensor           _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
  a parameter        _rebuild_parameter(tensor, requires_grad, hooks)
  a storage          BINPERSID of ('storage', torch.<Type>Storage, key, location, numel)
  size, stride       flat tuples of at most 64 ints

Every other opcode, call, key or nesting is refused before a value is built, hashed or printed; nothing here
formats more than a bounded summary. The real unpickler (torch_bin.StateDictUnpickler) then runs on a stream whose
every value has one of these shapes.
"""
from __future__ import annotations

import io
import pickletools

from ..errors import CheckpointError
from .untrusted import MAX_DIMS, summary

MAX_OPS = 2**22  # a 70B state dict is ~25 opcodes a tensor, ~20,000 in all; this bounds the scan to seconds
MAX_MARKS = 16  # open MARKs; torch.save nests 4 (SETITEMS, call arguments, persistent id, a >3-d size)
MAX_DICT_DEPTH = 8  # dicts in dicts; torch.save's deepest is 4 (state dict <- BUILD {'_metadata': {'': {...}}})
MAX_STRING = 65536  # characters; tensor names and storage keys are short

OPCODES = {  # what torch.save's pickler (and protocol 4 for the same values) emits; nothing else is read
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT",
    "EMPTY_LIST", "SETITEM", "SETITEMS", "BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1",
    "NONE", "NEWTRUE", "NEWFALSE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID", "BINPUT",
    "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
}
NAMES = {op.code.encode("latin-1"): op.name for op in pickletools.opcodes}  # b"R" -> "REDUCE"
READABLE = {op.code.encode("latin-1"): op for op in pickletools.opcodes if op.name in OPCODES}
TENSOR_ARGS = ("storage", "int", "ints", "ints", "bool", "dict")
CALLS = {  # callable -> the argument shapes (labels, below) it accepts
    "collections.OrderedDict": [()],
    "torch._utils._rebuild_tensor": [TENSOR_ARGS[:4]],
    "torch._utils._rebuild_tensor_v2": [TENSOR_ARGS, TENSOR_ARGS + ("dict",)],
    "torch._utils._rebuild_parameter": [("tensor", "bool", "dict")],
    "torch._utils._rebuild_parameter_with_state": [("tensor", "bool", "dict", state) for state in ("dict", "none")],
}
PERSISTENT_ID = ("str", "global", "str", "str", "int")  # ('storage', storage class, key, location, numel)
TUPLE_ITEMS = {"str", "int", "bool", "none", "global", "storage", "tensor", "dict", "ints"}  # never a nested tuple
DICT_VALUES = {"str", "int", "bool", "none", "tensor", "dict"}  # dict keys are str only: hashing them is cheap


class Node:
    """An abstract value that is not a str, int, bool, None or tuple: a global, a storage, a tensor, a list or a
    dict (a dict is sealed once it is stored somewhere, so that no dict can come to contain itself)."""

    __slots__ = ("label", "name", "depth", "sealed")

    def __init__(self, label, name=""):
        self.label, self.name, self.depth, self.sealed = label, name, 1, False


def label(value) -> str:
    """The shape of an abstract value: 'str', 'int', 'bool', 'none', 'ints', 'tuple', or a Node's label."""
    if isinstance(value, Node):
        return value.label
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, tuple):
        return "ints" if all(label(v) == "int" for v in value) else "tuple"
    return "int" if isinstance(value, int) else "str"


def check_state_dict_pickle(data: bytes, allowed_globals, storage_types) -> None:
    """Walk data.pkl on an abstract stack; CheckpointError at the first opcode that a state dict never has."""
    scan = _Scan(allowed_globals, storage_types)
    try:
        for name, arg, position in opcodes(data):
            scan.step(name, arg, position)
    except CheckpointError:
        raise
    except ValueError as exc:  # pickletools' readers: a truncated argument; bad UTF-8 (UnicodeDecodeError)
        raise CheckpointError(f"data.pkl is not a pickle ({type(exc).__name__}: {str(exc)[:120]})") from None


def opcodes(data: bytes):
    """(name, argument, byte position) of each opcode up to STOP, as pickletools.genops gives them, except that an
    opcode outside OPCODES is refused before its argument is read (genops would decode it first)."""
    stream = io.BytesIO(data)
    for _ in range(MAX_OPS):
        position, code = stream.tell(), stream.read(1)
        if not code:
            raise CheckpointError("data.pkl ends before its STOP opcode")
        if code not in READABLE:
            what = f"the opcode {NAMES[code]}" if code in NAMES else f"the byte {code!r}, not an opcode,"
            raise CheckpointError(f"data.pkl has {what} at byte {position}, which a state dict never needs: "
                                  "refused before unpickling")
        op = READABLE[code]
        if op.name == "GLOBAL":  # read as pickle reads it (pickletools would escape-decode it first)
            yield op.name, (_line(stream), _line(stream)), position
        else:
            yield op.name, (op.arg.reader(stream) if op.arg is not None else None), position
        if op.name == "STOP":
            return
    raise CheckpointError(f"data.pkl has more than {MAX_OPS} opcodes; a state dict has far fewer")


def _line(stream) -> str:
    """One newline-terminated UTF-8 line of a GLOBAL argument, without its newline."""
    line = stream.readline(MAX_STRING)
    if not line.endswith(b"\n"):
        raise CheckpointError("data.pkl has a GLOBAL whose name is not a line of at most 64 KiB")
    return line[:-1].decode("utf-8")


class _Scan:
    """The abstract pickle machine: a stack of abstract values, the open MARKs and the memo."""

    def __init__(self, allowed_globals, storage_types):
        self.allowed, self.storage_types = allowed_globals, storage_types
        self.stack, self.marks, self.memo = [], [], {}

    def step(self, name, arg, position):
        """One opcode: the ones that push a value here, the rest in structure()."""
        if name in ("BINUNICODE", "SHORT_BINUNICODE"):
            if len(arg) > MAX_STRING:
                raise CheckpointError(f"data.pkl holds a string of {len(arg)} characters (limit {MAX_STRING})")
            self.stack.append(arg)
        elif name in ("BININT", "BININT1", "BININT2", "LONG1"):
            self.stack.append(arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            self.stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("EMPTY_DICT", "EMPTY_LIST"):
            self.stack.append(Node("dict" if name == "EMPTY_DICT" else "list"))
        elif name == "MARK":
            if len(self.marks) >= MAX_MARKS:
                raise CheckpointError(f"data.pkl nests more than {MAX_MARKS} MARKs; a state dict nests 4")
            self.marks.append(len(self.stack))
        elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"):
            count = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name)
            self.stack.append(self.tuple(self.pop_mark() if count is None else self.pop(count)))
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            self.stack.append(self.global_(*(arg if name == "GLOBAL" else self.pop(2))))
        else:
            self.structure(name, arg, position)

    def structure(self, name, arg, position):
        """The opcodes that combine values: calls, persistent ids, dict items, the memo, PROTO, STOP (opcodes()
        reads nothing after STOP, as pickle does; FRAME, a protocol-4 length prefix, needs nothing)."""
        if name == "REDUCE":
            self.stack.append(self.call(*self.pop(2)))
        elif name == "BINPERSID":
            self.stack.append(self.persistent_id(*self.pop(1)))
        elif name == "SETITEM":
            self.set_items(self.top_dict(len(self.stack) - 2), self.pop(2))
        elif name == "SETITEMS":
            items = self.pop_mark()
            self.set_items(self.top_dict(len(self.stack)), items)
        elif name == "BUILD":
            state = self.pop(1)[0]
            self.build(self.peek(), state)
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = self.peek()
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise CheckpointError(f"data.pkl reads memo entry {arg}, which was never stored")
            self.stack.append(self.memo[arg])
        elif name == "PROTO":
            if position != 0 or not 2 <= arg <= 5:
                raise CheckpointError(f"data.pkl has PROTO {arg} at byte {position}; torch.save writes PROTO 2 first")
        elif name == "STOP":
            if len(self.stack) != 1 or self.marks:
                raise CheckpointError(f"data.pkl stops with {len(self.stack)} values on its stack, not one")

    def pop(self, count):
        if len(self.stack) - count < (self.marks[-1] if self.marks else 0):
            raise CheckpointError("data.pkl pops more values than it pushed (stack underflow)")
        values = self.stack[len(self.stack) - count:]
        del self.stack[len(self.stack) - count:]
        return values

    def pop_mark(self):
        if not self.marks:
            raise CheckpointError("data.pkl closes a MARK it never opened")
        start = self.marks.pop()
        values = self.stack[start:]
        del self.stack[start:]
        return values

    def peek(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise CheckpointError("data.pkl memoizes a value that is not there (empty stack)")
        return self.stack[-1]

    def tuple(self, items):
        """A tuple of plain values, size and stride tuples included: never a tuple of tuples of tuples."""
        if len(items) > MAX_DIMS:
            raise CheckpointError(f"data.pkl builds a tuple of {len(items)} items; a state dict's longest is a size "
                                  f"of at most {MAX_DIMS}")
        for item in items:
            if label(item) not in TUPLE_ITEMS:
                raise CheckpointError(f"data.pkl nests a {label(item)} in a tuple; a state dict never does")
            self.seal(item)
        return tuple(items)

    def global_(self, module, name):
        if not (isinstance(module, str) and isinstance(name, str)):
            raise CheckpointError("data.pkl names a global with values that are not strings")
        qualified = f"{module}.{name}"
        if qualified not in self.allowed:
            raise CheckpointError(f"the pickle asks for the global {summary(qualified)[1:-1]}, which a state dict "
                                  "never needs: refused, nothing was imported or called")
        return Node("global", qualified)

    def call(self, function, args):
        """REDUCE: one of CALLS, with one of the argument shapes it accepts -> a dict or a tensor."""
        name = function.name if label(function) == "global" else ""
        if name not in CALLS:
            what = name or label(function)
            raise CheckpointError(f"data.pkl calls {summary(what)}, which is not a function a state dict calls")
        if not isinstance(args, tuple):
            raise CheckpointError(f"data.pkl calls {name} on a {label(args)}, not on a tuple of arguments")
        shape = tuple(label(a) for a in args)
        if shape not in CALLS[name]:
            raise CheckpointError(f"data.pkl calls {name} with arguments ({', '.join(shape)}); a state dict "
                                  f"passes {' or '.join('(' + ', '.join(s) + ')' for s in CALLS[name])}")
        for a in args:
            self.seal(a)
        return Node("dict" if name == "collections.OrderedDict" else "tensor")

    def persistent_id(self, pid):
        shape = tuple(label(v) for v in pid) if isinstance(pid, tuple) else (label(pid),)
        if shape != PERSISTENT_ID or pid[0] != "storage" or pid[1].name not in self.storage_types:
            raise CheckpointError(f"the pickle has persistent id {summary(pid)}, not a storage reference "
                                  "('storage', torch.<Type>Storage, key, location, numel)")
        return Node("storage")

    def top_dict(self, index):
        """The dict that SETITEM(S) adds to: below its items, not yet stored anywhere else."""
        target = self.stack[index - 1] if index >= 1 else None
        if label(target) != "dict" or target.sealed:
            raise CheckpointError(f"data.pkl sets items on a {label(target)}, not on a dict being built")
        return target

    def set_items(self, target, items):
        if len(items) % 2:
            raise CheckpointError("data.pkl has SETITEMS with a key and no value")
        for key, value in zip(items[::2], items[1::2]):
            if label(key) != "str" or label(value) not in DICT_VALUES:
                raise CheckpointError(f"data.pkl puts a {label(value)} under a {label(key)} key in a dict; a state "
                                      "dict maps str keys to tensors")
            self.nest(target, value)

    def build(self, target, state):
        """BUILD: only the state dict's attributes ({'_metadata': ...}), set on a dict from its state, a dict."""
        if label(target) != "dict" or label(state) != "dict" or target.sealed:
            raise CheckpointError(f"data.pkl sets the state of a {label(target)} from a {label(state)}; a state "
                                  "dict only sets its _metadata")
        self.nest(target, state)

    def nest(self, target, value):
        """value goes into the dict target: sealed, and target's depth grows to hold it."""
        if value is target:
            raise CheckpointError("data.pkl puts a dict into itself; a state dict never contains itself")
        self.seal(value)
        if label(value) == "dict":
            target.depth = max(target.depth, value.depth + 1)
            if target.depth > MAX_DICT_DEPTH:
                raise CheckpointError(f"data.pkl nests dicts more than {MAX_DICT_DEPTH} deep")

    @staticmethod
    def seal(value):
        if label(value) == "dict":
            value.sealed = True
