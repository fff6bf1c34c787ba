"""The mutants of one module: source text in, a list of small edits out.

A mutant replaces one span of the source (an AST node's exact position) with
new text, so the rest of the file, comments included, stays as it was.  What
is mutated, and why these:

  compare   a comparison negated (== / !=, < / >=, in / not in, is / is not)
            and, for ordered ones, its boundary moved (< / <=, > / >=)
  boolop    `and` / `or` swapped
  negate    the condition of an if, elif, while, conditional expression or
            comprehension filter negated
  unary     `not x`, `-x`, `~x` become `x`
  const     True / False swapped; an int n becomes n + 1 (and 1 also 0); a
            float x becomes x + 1; a string or bytes compared with something
            becomes empty (or "X" when it was empty)
  binop     + / -, * / //, | / &, << / >>, ... (also in `x += 1`)
  loopctl   break / continue swapped
  delete    a statement in a function body (a call, an assignment, a return,
            a raise, a del) replaced by `pass`

Not mutated: docstrings, type annotations, f-strings, log calls
(`log.info(...)` and friends: their text is not behaviour), `if
TYPE_CHECKING:` and `if __name__ == "__main__":` blocks, and statements run
at import (deleting one only raises NameError at import).  Constants at import
(enum values, defaults, tables) are mutated: their changes are behaviour.

A mutant's id is stable while the node it changes is: path, enclosing
function or class, kind, and a digest of the original text, the new text and
how many identical edits came before it in the same scope.  Line numbers are
not part of it, so an edit elsewhere in the file keeps every other id.
"""

from __future__ import annotations

import ast
import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

LOGGERS = frozenset({"log", "logger", "child_log", "LOG"})
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})

_NEGATED: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt,
    ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_BOUNDARY: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
}
_BINOPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr, ast.BitXor: ast.BitOr, ast.LShift: ast.RShift,
    ast.RShift: ast.LShift, ast.Pow: ast.Mult,
}
_DELETABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Raise,
              ast.Delete)


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str  # relative to the tree, with forward slashes
    line: int
    end_line: int
    kind: str
    original: str  # the text replaced
    replacement: str
    at_import: bool  # runs when the module is imported, not inside a function
    start: int  # byte offsets into the UTF-8 source
    end: int

    @property
    def description(self) -> str:
        return f"`{_short(self.original)}` -> `{_short(self.replacement)}`"

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.replacement.encode() + source[self.end:]


def _short(text: str, limit: int = 70) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


@dataclass(frozen=True)
class _Edit:
    node: ast.AST
    kind: str
    replacement: str


class _Finder(ast.NodeVisitor):
    def __init__(self) -> None:
        # (edit, scope, at import, region: the innermost def or class, or the statement
        # at module level, re-parsed alone to check the edit)
        self.edits: list[tuple[_Edit, str, bool, ast.stmt]] = []
        self.region: ast.stmt | None = None
        self.scope: list[str] = []
        self.function_depth = 0
        self.last_statement: ast.stmt | None = None  # of the function being visited

    # --- where we are -------------------------------------------------------------------

    def _add(self, node: ast.AST, kind: str, replacement: str) -> None:
        assert self.region is not None
        self.edits.append((_Edit(node, kind, replacement), ".".join(self.scope) or "<module>",
                           self.function_depth == 0, self.region))

    def _visit_def(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self._visit_arguments(node.args)  # defaults: evaluated at import
        self.scope.append(node.name)
        self.function_depth += 1
        outer, self.last_statement = self.last_statement, node.body[-1]
        region, self.region = self.region, node
        self._visit_body(node.body)
        self.region = region
        self.last_statement = outer
        self.function_depth -= 1
        self.scope.pop()

    visit_FunctionDef = _visit_def
    visit_AsyncFunctionDef = _visit_def

    def _visit_arguments(self, args: ast.arguments) -> None:
        for d in [*args.defaults, *args.kw_defaults]:
            if d is not None:
                self.visit(d)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_arguments(node.args)
        self.function_depth += 1
        self.visit(node.body)
        self.function_depth -= 1

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(d)
        self.scope.append(node.name)
        region, self.region = self.region, node
        self._visit_body(node.body)
        self.region = region
        self.scope.pop()

    def visit_Module(self, node: ast.Module) -> None:
        for i, stmt in enumerate(node.body):
            if i == 0 and _is_docstring(stmt):
                continue
            self.region = stmt
            self.visit(stmt)

    def _visit_body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if i == 0 and _is_docstring(stmt):
                continue
            self.visit(stmt)

    # --- what is left alone ---------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        return

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        return

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # positions inside f-strings are not reliable before 3.12

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._maybe_delete(node)
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        return

    # --- statements -------------------------------------------------------------------------

    def _maybe_delete(self, node: ast.stmt) -> None:
        if self.function_depth and not _is_log_call(node):
            self._add(node, "delete", "pass")

    def visit_Expr(self, node: ast.Expr) -> None:
        if _is_log_call(node) or _is_docstring(node):
            return
        self._maybe_delete(node)
        self.visit(node.value)

    def visit_Assign(self, node: ast.Assign) -> None:
        self._maybe_delete(node)
        self.visit(node.value)  # targets: never (a changed target is a NameError)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._maybe_delete(node)
        new = _BINOPS.get(type(node.op))
        if new is not None and not _is_text(node.value):
            self._add(node, "binop", ast.unparse(ast.AugAssign(node.target, new(), node.value)))
        self.visit(node.value)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None or node is not self.last_statement:
            self._maybe_delete(node)  # a bare return that ends a function does nothing
        if node.value is not None:
            self.visit(node.value)

    def visit_Raise(self, node: ast.Raise) -> None:
        self._maybe_delete(node)  # the exception's arguments are messages: left alone

    def visit_Delete(self, node: ast.Delete) -> None:
        self._maybe_delete(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        return  # asserts narrow types for mypy; they are not how the code behaves

    def visit_Break(self, node: ast.Break) -> None:
        self._add(node, "loopctl", "continue")

    def visit_Continue(self, node: ast.Continue) -> None:
        self._add(node, "loopctl", "break")

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test) or _is_main_guard(node.test):
            return
        self._negate(node.test)
        self.visit(node.test)
        self._visit_body(node.body)
        self._visit_body(node.orelse)

    def visit_While(self, node: ast.While) -> None:
        self._negate(node.test)
        self.visit(node.test)
        self._visit_body(node.body)
        self._visit_body(node.orelse)

    # --- expressions -----------------------------------------------------------------------

    def _negate(self, test: ast.expr) -> None:
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return  # dropping the `not` is the unary mutant
        if isinstance(test, ast.Constant):
            return  # `while True`: the constant's own mutant
        self._add(test, "negate", f"not ({_segment_placeholder})")

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self._negate(node.test)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        for cond in node.ifs:
            self._negate(cond)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            for table in (_NEGATED, _BOUNDARY):
                new = table.get(type(op))
                if new is not None:
                    ops = list(node.ops)
                    ops[i] = new()
                    self._add(node, "compare",
                              f"({ast.unparse(ast.Compare(node.left, ops, node.comparators))})")
        for operand in [node.left, *node.comparators]:
            for c, text in _compared_texts(operand):
                self._add(c, "const", repr(_other_text(text)))
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        other: ast.boolop = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self._add(node, "boolop", f"({ast.unparse(ast.BoolOp(other, node.values))})")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        new = _BINOPS.get(type(node.op))
        if new is not None and not (_is_text(node.left) or _is_text(node.right)):
            self._add(node, "binop", f"({ast.unparse(ast.BinOp(node.left, new(), node.right))})")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            self.generic_visit(node)  # -1: the constant's own mutant changes it
            return
        if not isinstance(node.op, ast.UAdd):
            self._add(node, "unary", f"({_segment_placeholder_operand})")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, bool):
            self._add(node, "const", repr(not v))
        elif isinstance(v, int):
            self._add(node, "const", repr(v + 1))
            if v == 1:
                self._add(node, "const", "0")
        elif isinstance(v, float):
            self._add(node, "const", repr(v + 1.0))

    def visit_Call(self, node: ast.Call) -> None:
        if _is_log_call(node):
            return
        self.generic_visit(node)


# Stand-ins resolved against the source once positions are known: a negation
# wraps the node's own text, a unary mutant keeps its operand's text.
_segment_placeholder = "\0SEGMENT\0"
_segment_placeholder_operand = "\0OPERAND\0"


def _is_docstring(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _is_log_call(node: ast.AST) -> bool:
    call = node.value if isinstance(node, ast.Expr) else node
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr in LOG_METHODS and isinstance(call.func.value, ast.Name)
            and call.func.value.id in LOGGERS)


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _is_text(node: ast.expr) -> bool:
    return (isinstance(node, ast.JoinedStr)
            or (isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)))


def _compared_texts(operand: ast.expr) -> Iterator[tuple[ast.Constant, str | bytes]]:
    """String and bytes constants compared with something, also inside a literal
    tuple, list or set on either side (`x in ("a", "b")`)."""
    items = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
    for item in items:
        if isinstance(item, ast.Constant) and isinstance(item.value, str | bytes):
            yield item, item.value


def _other_text(value: str | bytes) -> str | bytes:
    if isinstance(value, bytes):
        return b"" if value else b"X"
    return "" if value else "X"


class _Source:
    """Byte offsets of (line, column) positions; ast columns count UTF-8 bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.starts = [0]
        for i, b in enumerate(data):
            if b == 0x0A:
                self.starts.append(i + 1)

    def offset(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                self.offset(node.end_lineno, node.end_col_offset))  # type: ignore[attr-defined]

    def text(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode()

    def lines_of(self, node: ast.stmt) -> tuple[int, int]:
        """Byte span of the whole lines of a statement, its decorators included."""
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        last = node.end_lineno or node.lineno
        end = self.starts[last] if last < len(self.starts) else len(self.data)
        return self.starts[first - 1], end


def _region_tree(text: bytes, indented: bool) -> str | None:
    """The dump of a region parsed alone (inside `if 1:` when it is indented), or None."""
    try:
        return ast.dump(ast.parse(b"if 1:\n" + text if indented else text))
    except SyntaxError:
        return None


def mutants(path: str, source: bytes) -> list[Mutant]:
    """Every mutant of `source` (the module at `path`, relative), in source order.

    Edits whose result does not parse, or parses to the same tree, are dropped."""
    tree = ast.parse(source)
    src = _Source(source)
    finder = _Finder()
    finder.visit(tree)
    seen: Counter[tuple[str, str, str, str]] = Counter()
    out: list[Mutant] = []
    dumps: set[tuple[int, str]] = set()
    originals: dict[int, str | None] = {}
    for edit, scope, at_import, region in finder.edits:
        node = edit.node
        original = src.text(node)
        replacement = edit.replacement
        if _segment_placeholder in replacement:
            replacement = replacement.replace(_segment_placeholder, original)
        if _segment_placeholder_operand in replacement:
            replacement = replacement.replace(_segment_placeholder_operand,
                                              src.text(node.operand))  # type: ignore[attr-defined]
        start, end = src.span(node)
        key = (scope, edit.kind, original, replacement)
        occurrence = seen[key]
        seen[key] += 1
        digest = hashlib.sha1(f"{original}\0{replacement}\0{occurrence}".encode(),
                              usedforsecurity=False).hexdigest()[:8]
        m = Mutant(id=f"{path}:{scope}:{edit.kind}:{digest}", path=path,
                   line=node.lineno, end_line=node.end_lineno,  # type: ignore[attr-defined]
                   kind=edit.kind, original=original, replacement=replacement,
                   at_import=at_import, start=start, end=end)
        # Parsed is the enclosing def, class or statement alone: the rest of the file is
        # unchanged, and parsing the whole file for each mutant is what made this slow.
        a, b = src.lines_of(region)
        indented = region.col_offset > 0
        if a not in originals:
            originals[a] = _region_tree(source[a:b], indented)
        dump = _region_tree(source[a:start] + m.replacement.encode() + source[end:b], indented)
        if dump is None or dump == originals[a] or (a, dump) in dumps:
            continue
        dumps.add((a, dump))
        out.append(m)
    out.sort(key=lambda m: (m.start, m.end, m.id))
    return out
