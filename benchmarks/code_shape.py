#!/usr/bin/env python3
"""The shape of the code: lines per module and the longest functions (issue 12's figures).

    python3 benchmarks/code_shape.py [--root CHECKOUT] [--top 15] [--over 500]

Counts every .py file under nst_core/, daemon/ and gimp_plugin/ (tests and benchmarks are not
product code). A function's length is from its `def` line to its last line, decorators and
docstring included; methods are named Class.method. Standard library only, so it runs against any
checkout (--root) without its environment.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGES = ("nst_core", "daemon", "gimp_plugin")


def modules(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if ".venv" not in p.parts)


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, lines) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.end_lineno - node.lineno + 1
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--top", type=int, default=15, help="how many of the longest functions to list")
    ap.add_argument("--over", type=int, default=500, help="flag modules longer than this")
    args = ap.parse_args()
    root = args.root.resolve()
    sizes, funcs = [], []
    for path in modules(root):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        sizes.append((len(text.splitlines()), rel))
        funcs += [(n, f"{rel}:{name}") for name, n in functions(ast.parse(text, rel))]
    print(f"lines per module ({root})")
    for n, rel in sorted(sizes, reverse=True):
        print(f"{n:6d}  {rel}{'   <- over %d' % args.over if n > args.over else ''}")
    print(f"{sum(n for n, _ in sizes):6d}  in all, {len(sizes)} modules; "
          f"{sum(1 for n, _ in sizes if n > args.over)} over {args.over} lines")
    print(f"\nthe {args.top} longest functions")
    for n, name in sorted(funcs, reverse=True)[:args.top]:
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
