"""Does ``model.matmul: int8`` really multiply int8 codes? Reads an HLO module's text (lowered or
compiled) and says how each BitLinear forward product runs.

The verdicts, from the compiled (optimised) HLO:

- ``cuBLAS int8 GEMM``: a ``custom-call`` to cuBLAS (``__cublas$gemm``, ``__cublas$lt$matmul``) with
  s8 operands;
- ``Triton int8 fusion``: an s8 x s8 ``dot`` inside a fusion whose backend config names Triton
  (``__triton_gemm``);
- ``XLA int8 dot``: an s8 x s8 ``dot`` elsewhere (XLA CPU's own or YNNPACK's kernel, or a lowered,
  not yet optimised module);
- ``not int8``: the BitLinear products multiply other types (``model.matmul: float``; or, for
  ``int8``, the compiler converted the codes to floats or wider integers first: an upcast).

    .venv/bin/python benchmarks/int8_hlo.py module.hlo.txt     # prints the verdict and the products
"""

from __future__ import annotations

import dataclasses
import re
import sys

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>\([^=]*?\)|\S+)\s+"
                          r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_DTYPE = re.compile(r"\(?\s*([a-z]+[0-9]*)\[")
SCOPE = "bitlinear_matmul"  # the named scope of the BitLinear products (bitnet_jax/model.py)


@dataclasses.dataclass
class Matmul:
    """One matrix product of the module: a ``dot`` or a GEMM ``custom-call``."""

    name: str
    computation: str
    op: str  # "dot" or "custom-call"
    target: str  # custom_call_target, or the kind of the fusion that calls this dot's computation
    operands: list[str]  # element types, e.g. ["s8", "s8"]
    result: str  # element type of the product (a GEMM custom-call's first tuple element)
    op_name: str  # the JAX op and named scopes, "" without metadata

    @property
    def forward_bitlinear(self) -> bool:
        """A BitLinear forward product (no metadata: counted, the module cannot say)."""
        return not self.op_name or (SCOPE in self.op_name and "transpose(" not in self.op_name)

    def describe(self) -> str:
        via = f" via {self.target}" if self.target else ""
        return f"{self.name}: {self.op}{via} {' x '.join(self.operands)} -> {self.result}  [{self.op_name or '-'}]"


def find_matmuls(hlo_text: str) -> list[Matmul]:
    """Every ``dot`` and GEMM ``custom-call`` of the module, with its operands' element types."""
    types: dict[tuple[str, str], str] = {}
    rows: list[tuple[str, re.Match]] = []
    callers: dict[str, str] = {}  # fused computation -> its fusion's kind / backend
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group("name")
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        types[(computation, m.group("name"))] = _dtype(m.group("type"))
        rows.append((computation, m))
        called = re.search(r"calls=%?([\w.\-]+)", m.group("rest"))
        if called:
            kind = re.search(r'"kind":"([^"]+)"', m.group("rest"))
            callers[called.group(1)] = kind.group(1) if kind else ""
    out = []
    for comp, m in rows:
        op, rest = m.group("op"), m.group("rest")
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        if op == "custom-call" and not (target and re.search(r"gemm|matmul", target.group(1), re.I)):
            continue
        if op not in ("dot", "custom-call"):
            continue
        args = m.group("args")
        names = re.findall(r"%([\w.\-]+)", args) if "%" in args else [a.strip() for a in args.split(",")]
        operands = [types.get((comp, n), "?") for n in names[:2]]
        op_name = re.search(r'op_name="([^"]*)"', rest)
        out.append(Matmul(m.group("name"), comp, op, target.group(1) if target else callers.get(comp, ""),
                          operands, _dtype(m.group("type")), op_name.group(1) if op_name else ""))
    return out


def verdict(matmuls: list[Matmul]) -> str:
    """One line: how the BitLinear forward products run (see the module docstring)."""
    forward = [m for m in matmuls if m.forward_bitlinear]
    if not forward:
        return "no BitLinear forward product found in the HLO"
    int8 = [m for m in forward if m.operands and all(t == "s8" for t in m.operands)]
    if not int8:
        kinds = sorted({" x ".join(m.operands) for m in forward})
        return (f"not int8: none of the {len(forward)} BitLinear forward products multiplies s8 operands "
                f"({', '.join(kinds)})")
    kinds = []
    for m in int8:
        if "cublas" in m.target.lower():
            kinds.append(f"cuBLAS int8 GEMM ({m.target})")
        elif "triton" in m.target.lower():
            kinds.append(f"Triton int8 fusion ({m.target})")
        else:
            kinds.append("XLA int8 dot")
    summary = ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds)))
    rest = len(forward) - len(int8)
    return f"{len(int8)} of {len(forward)} BitLinear forward products are s8 x s8 -> {int8[0].result}: {summary}" + (
        f"; {rest} upcast" if rest else "")


def _dtype(type_text: str) -> str:
    m = _DTYPE.match(type_text)
    return m.group(1) if m else type_text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        matmuls = find_matmuls(f.read())
    print(verdict(matmuls))
    for m in matmuls:
        if m.forward_bitlinear:
            print("  " + m.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
