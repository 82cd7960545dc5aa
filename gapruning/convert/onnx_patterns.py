"""ONNX subgraphs that are one op of ours, fused before the import.

GELU: exporters targeting opsets without the ``Gelu`` op (torch's, below opset
20) write ``0.5 * x * (1 + erf(x / sqrt(2)))`` as ``Div`` (or ``Mul`` by
``1/sqrt(2)``), ``Erf``, ``Add`` of 1 and two ``Mul`` (by ``x`` and by 0.5, in
either order, or ``x`` times 0.5 first). Each such chain whose intermediate
values have no other reader becomes one ``Gelu`` node.

Restriding: torch's dynamo exporter writes an ``as_strided`` that changes nothing
(after ``adaptive_avg_pool2d``) as a ``Reshape`` to ``[-1]`` and a ``Gather`` of
the indices ``0, 1, ..., n - 1`` laid out in some shape: that is a ``Reshape``
to the shape.
"""

from __future__ import annotations

import math

import numpy as np


def constant_values(nodes, consts: dict) -> dict:
    """Initializers and ``Constant`` node values, by tensor name."""
    from onnx import numpy_helper

    values = dict(consts)
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


class _Chain:
    """Finds GELU chains in a node list."""

    def __init__(self, nodes, values, outputs):
        self.values = values
        self.producer = {o: n for n in nodes for o in n.output}
        self.readers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        for o in outputs:  # a graph output has a reader outside the graph
            self.readers.setdefault(o, []).append(None)

    def is_const(self, name, value) -> bool:
        v = self.values.get(name)
        return (
            v is not None
            and np.size(v) == 1
            and math.isclose(float(np.ravel(v)[0]), value, rel_tol=1e-5)
        )

    def other(self, node, name):
        """The input of a binary ``node`` that is not ``name`` (None: neither)."""
        ins = list(node.input)
        if len(ins) != 2 or name not in ins:
            return None
        return ins[1] if ins[0] == name else ins[0]

    def sole_reader(self, name, op_type):
        readers = self.readers.get(name, [])
        if len(readers) == 1 and readers[0] is not None:
            if readers[0].op_type == op_type:
                return readers[0]
        return None

    def match(self, erf):
        """``(x, nodes of the chain, last node)`` of the GELU around ``erf``."""
        d = self.producer.get(erf.input[0])
        if d is None or self.sole_reader(d.output[0], "Erf") is not erf:
            return None
        if d.op_type == "Div" and self.is_const(d.input[1], math.sqrt(2)):
            x = d.input[0]
        elif d.op_type == "Mul":
            c = next((i for i in d.input if self.is_const(i, 1 / math.sqrt(2))), None)
            x = self.other(d, c) if c is not None else None
        else:
            return None
        add = self.sole_reader(erf.output[0], "Add")
        if x is None or add is None:
            return None
        if not self.is_const(self.other(add, erf.output[0]), 1.0):
            return None
        tail = self.product(x, add.output[0])
        return None if tail is None else (x, [d, erf, add, *tail], tail[-1])

    def product(self, x, one_plus_erf):
        """The Mul nodes making ``0.5 * x * one_plus_erf``, last one last."""
        m1 = self.sole_reader(one_plus_erf, "Mul")
        if m1 is None:
            return None
        other = self.other(m1, one_plus_erf)
        half = self.producer.get(other)
        if half is not None and half.op_type == "Mul" and len(self.readers[other]) == 1:
            if self.is_const(self.other(half, x), 0.5):  # (x * 0.5) * (1 + erf)
                return [half, m1]
        m2 = self.sole_reader(m1.output[0], "Mul")
        if m2 is None:
            return None
        last = self.other(m2, m1.output[0])
        if (other == x and self.is_const(last, 0.5)) or (
            self.is_const(other, 0.5) and last == x
        ):
            return [m1, m2]
        return None


def fuse_restride(nodes, consts: dict) -> list:
    """``nodes`` with each ``Reshape(x, [-1])`` read only by a ``Gather`` (axis
    0) of ``arange(n)`` in shape ``S`` replaced by one ``Reshape(x, S)`` (the
    shape is added to ``consts``)."""
    from onnx import helper

    values = constant_values(nodes, consts)
    chain = _Chain(nodes, values, ())
    replace, drop = {}, set()
    for n in nodes:
        shape = values.get(n.input[1]) if n.op_type == "Reshape" else None
        if shape is None or np.asarray(shape).tolist() != [-1]:
            continue
        gather = chain.sole_reader(n.output[0], "Gather")
        if gather is None or any(a.name == "axis" and a.i for a in gather.attribute):
            continue
        index = values.get(gather.input[1])
        if index is None:
            continue
        if not np.array_equal(np.ravel(index), np.arange(np.size(index))):
            continue
        target = f"{gather.output[0]}.shape"
        consts[target] = np.asarray(np.shape(index), np.int64)
        drop.add(id(n))
        replace[id(gather)] = helper.make_node(
            "Reshape", [n.input[0], target], [gather.output[0]], name=gather.name
        )
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]


def fuse_gelu(nodes, consts: dict, outputs) -> list:
    """``nodes`` (ONNX NodeProtos in order) with each erf form of GELU replaced
    by one ``Gelu`` node where its last node was; ``outputs``: graph outputs."""
    from onnx import helper

    chain = _Chain(nodes, constant_values(nodes, consts), outputs)
    replace, drop = {}, set()
    for n in nodes:
        found = chain.match(n) if n.op_type == "Erf" else None
        if found is None:
            continue
        x, members, last = found
        name = last.name or f"gelu_{last.output[0]}"
        replace[id(last)] = helper.make_node("Gelu", [x], [last.output[0]], name=name)
        drop |= {id(m) for m in members if m is not last}
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]
