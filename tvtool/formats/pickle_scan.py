"""The shape of a pickle, checked before it is unpickled: how many objects it expands to and how deeply they nest.

A restricted unpickler decides which globals a pickle may name, but the pickle machine itself can still be made to
spend unbounded time or crash: memo references let a few hundred bytes build a tuple whose full expansion has 10^12
items ("billion laughs": each level a tuple of ten references to the level below), and Python hashes such a tuple
(as a dict key) by walking every item; a tuple nested 10^5 deep as a dict key overflows the C stack while being
hashed (a segmentation fault, not an exception). Both happen inside ``pickle.Unpickler.load``, before any hook of
ours runs.

So every pickle tvtool reads (checkpoints: ``safe_pickle``; data files: ``numpy_pickle``) is first run through an
abstract pickle machine that builds nothing: each object is a node, containers list the nodes they hold, the memo
holds node numbers. Then the number of objects each node expands to and its nesting depth are computed over that
graph (linear in the pickle's size, loops counted once) and the pickle is refused past :data:`MAX_EXPANDED` /
:data:`MAX_DEPTH`. Declared lengths are checked against the bytes that really follow (``pickletools`` reads them).
No torch, no numpy: the foundation layer.
"""
from __future__ import annotations

import io
import os
import pickletools

# The largest real pickles tvtool reads (a whole-module checkpoint, a CIFAR batch's lists) expand to well under
# 10^6 objects and nest under 50 levels.
MAX_EXPANDED = 10_000_000
MAX_DEPTH = 500

_MARK = -1
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # add to the container below
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


class PickleShape(Exception):
    """The pickle is malformed or expands / nests past the bounds (message: what, in a few words)."""


class _Bounded:
    """A file the scan reads from: a read never asks for more than the file still holds (a length declared in
    the pickle would otherwise be allocated first by the buffered reader)."""

    def __init__(self, f, end: int):
        self._f, self._end = f, end

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._end - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline(max(0, self._end - self._f.tell()))


def _ops(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return pickletools.genops(io.BytesIO(source))
    return pickletools.genops(_Bounded(source, os.fstat(source.fileno()).st_size))


def check(source, *, max_expanded: int = MAX_EXPANDED, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`PickleShape` unless the pickle in ``source`` (bytes, or a file positioned at its start, left
    positioned after its STOP) is well formed and expands to at most ``max_expanded`` objects nested at most
    ``max_depth`` deep."""
    children: list[list[int]] = []
    stack: list[int] = []
    memo: dict = {}

    def new(items=()) -> int:
        children.append(list(items))
        return len(children) - 1

    def pop_mark() -> list[int]:
        if _MARK not in stack:
            raise PickleShape("a pickle whose opcodes do not match (no MARK)")
        i = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[i + 1:]
        del stack[i:]
        return items

    def pop(n: int) -> list[int]:
        if len(stack) < n or _MARK in stack[len(stack) - n:]:
            raise PickleShape("a pickle whose opcodes do not match (stack underflow)")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    try:
        for op, arg, _ in _ops(source):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                pop(1)
                break
            if name == "MARK":
                stack.append(_MARK)
            elif name in _GETS:
                if arg not in memo:
                    raise PickleShape("a pickle that reads a memo entry it never wrote")
                stack.append(memo[arg])
            elif name in _PUTS or name == "MEMOIZE":
                if not stack or stack[-1] == _MARK:
                    raise PickleShape("a pickle that memoizes nothing")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name == "POP":
                if not stack:
                    raise PickleShape("a pickle whose opcodes do not match (stack underflow)")
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.extend(pop(1) * 2)
            else:
                # what the opcode pops (per pickletools): the items above a MARK when it takes a stack slice, and
                # the fixed items below that (or all of them); in-place opcodes add to the first, the others make
                # one new object holding everything they popped
                before = [s.name for s in op.stack_before]
                fixed = before.index("mark") if "mark" in before else len(before)
                items = pop_mark() if fixed < len(before) else []
                items = pop(fixed) + items
                if name in _IN_PLACE:
                    children[items[0]].extend(items[1:])
                    stack.append(items[0])
                elif len(op.stack_after) == 1:
                    stack.append(new(items))
                else:
                    raise PickleShape(f"a pickle with opcode {name}")
        else:
            raise PickleShape("a pickle without its STOP opcode (truncated)")
    except ValueError as exc:  # pickletools: a length past the data, a bad text number, an unknown opcode
        if "exhausted before seeing STOP" in str(exc):
            raise PickleShape("a pickle without its STOP opcode (truncated)") from None
        raise PickleShape(f"not a valid pickle ({str(exc)[:100]})") from None
    _check_expansion(children, max_expanded, max_depth)


def _check_expansion(children: list[list[int]], max_expanded: int, max_depth: int) -> None:
    """Objects each node expands to (itself plus what it holds, shared nodes counted at every reference, a loop
    once) and its depth; iterative post-order DFS, each node computed once."""
    size = [0] * len(children)
    depth = [0] * len(children)
    state = bytearray(len(children))  # 0 new, 1 on the current path, 2 done
    for root in range(len(children)):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            node, i = stack[-1]
            kids = children[node]
            if i < len(kids):
                stack[-1] = (node, i + 1)
                child = kids[i]
                if state[child] == 0:
                    state[child] = 1
                    stack.append((child, 0))
                continue
            stack.pop()
            state[node] = 2
            total, deepest = 1, 0
            for child in kids:
                if state[child] == 2:  # a child still on the path is a loop: counted where it started
                    total += size[child]
                    deepest = max(deepest, depth[child])
            size[node] = min(total, max_expanded + 1)
            depth[node] = deepest + 1
            if size[node] > max_expanded:
                raise PickleShape(f"a pickle whose objects refer to each other over {max_expanded} times (a "
                                  "'billion laughs' pickle)")
            if depth[node] > max_depth:
                raise PickleShape(f"a pickle nesting objects over {max_depth} deep")
