"""A small, safe evaluator for OpenMM custom-force energy expressions (floats only).

The native energy never trusts an expression string by its spelling: it evaluates the
System's own expression at probe points and compares with the formula it implements
(see :mod:`boltzflow.energy.native`). Syntax follows OpenMM's Lepton: ``^`` is power,
``a; b=...; c=...`` defines intermediates, functions ``select, step, delta, min, max,
abs, sqrt, exp, log, sin, cos, tan, acos, asin, atan, atan2, sinh, cosh, tanh, erf, erfc,
square, cube, recip, floor, ceil``; tabulated functions are passed in as callables.
Nothing is ever passed to Python's ``eval``: the expression is parsed with :mod:`ast` and
only arithmetic, names and calls of the functions above are accepted.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Callable, Mapping

_TOKEN = re.compile(r"(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)")

_FUNCS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "acos": math.acos,
    "asin": math.asin,
    "atan": math.atan,
    "atan2": math.atan2,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "erf": math.erf,
    "erfc": math.erfc,
    "abs": abs,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "square": lambda a: a * a,
    "cube": lambda a: a * a * a,
    "recip": lambda a: 1.0 / a,
    "step": lambda a: 1.0 if a >= 0 else 0.0,
    "delta": lambda a: 1.0 if a == 0 else 0.0,
    "select": lambda a, b, c: b if a != 0 else c,
}


class ExpressionError(ValueError):
    """The expression uses syntax, a variable or a function this evaluator does not know."""


def _rename(text: str) -> str:
    # prefix identifiers so that names like ``or`` / ``lambda`` are legal Python; numbers stay
    return _TOKEN.sub(lambda m: m.group(1) if m.group(1) else "v_" + m.group(2), text).replace("^", "**")


def split_expression(expression: str) -> tuple[str, dict[str, str]]:
    """Split ``"main; a=...; b=..."`` into (main, {name: definition})."""
    parts = [p.strip() for p in expression.split(";")]
    parts = [p for p in parts if p]
    if not parts:
        raise ExpressionError("empty expression")
    defs: dict[str, str] = {}
    for p in parts[1:]:
        if "=" not in p:
            raise ExpressionError(f"cannot parse definition {p!r}")
        name, value = p.split("=", 1)
        defs[name.strip()] = value.strip()
    return parts[0], defs


def numeric_definitions(expression: str) -> dict[str, float]:
    """The definitions of ``expression`` whose value is a plain number (e.g. ``solventDielectric=78.5``)."""
    _, defs = split_expression(expression)
    out = {}
    for k, v in defs.items():
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


class _Evaluator:
    def __init__(self, defs: dict[str, ast.AST], variables: Mapping[str, float], functions: Mapping[str, Callable]):
        self.defs = defs
        self.variables = variables
        self.functions = {**_FUNCS, **functions}
        self.cache: dict[str, float] = {}
        self.stack: set[str] = set()

    def name(self, ident: str) -> float:
        if ident in self.cache:
            return self.cache[ident]
        if ident in self.defs:
            if ident in self.stack:
                raise ExpressionError(f"recursive definition of {ident!r}")
            self.stack.add(ident)
            val = self.node(self.defs[ident])
            self.stack.discard(ident)
        elif ident in self.variables:
            val = float(self.variables[ident])
        else:
            raise ExpressionError(f"unknown variable {ident!r}")
        self.cache[ident] = val
        return val

    def node(self, n: ast.AST) -> float:
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return float(n.value)
        if isinstance(n, ast.Name):
            return self.name(n.id[2:])
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = self.node(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp):
            a, b = self.node(n.left), self.node(n.right)
            if isinstance(n.op, ast.Add):
                return a + b
            if isinstance(n.op, ast.Sub):
                return a - b
            if isinstance(n.op, ast.Mult):
                return a * b
            if isinstance(n.op, ast.Div):
                return a / b
            if isinstance(n.op, ast.Pow):
                return a**b
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
            fname = n.func.id[2:]
            if fname not in self.functions:
                raise ExpressionError(f"unknown function {fname!r}")
            return float(self.functions[fname](*[self.node(a) for a in n.args]))
        raise ExpressionError(f"unsupported syntax {ast.dump(n)[:60]}")


class Expression:
    """A parsed OpenMM expression; call it with variable values (and tabulated functions)."""

    def __init__(self, expression: str):
        self.text = expression
        main, defs = split_expression(expression)
        try:
            self._main = ast.parse(_rename(main), mode="eval").body
            self._defs = {k: ast.parse(_rename(v), mode="eval").body for k, v in defs.items()}
        except SyntaxError as e:
            raise ExpressionError(f"cannot parse {expression!r}: {e}") from e

    def __call__(self, variables: Mapping[str, float], functions: Mapping[str, Callable] | None = None) -> float:
        ev = _Evaluator(self._defs, variables, functions or {})
        return ev.node(self._main)


def evaluate(expression: str, variables: Mapping[str, float], functions: Mapping[str, Callable] | None = None) -> float:
    """Value of an OpenMM expression for the given variable values (floats)."""
    return Expression(expression)(variables, functions)
