"""Bake fp16 into an fp32 ONNX graph, keeping LayerNormalization and Softmax in fp32.

TensorRT 11 builds strongly typed networks only (no FP16 builder flag), so the reduced precision
has to be written into the graph itself; ONNX Runtime runs the same graph. The conversion is a
graph rewrite of a traced fp32 export (tracing a half-precision model on a CPU takes minutes, the
rewrite a second):

* a node runs in fp16 when it consumes *data* (a graph input, a weight, or anything computed from
  them) and its schema accepts float16; weights it reads are stored as float16;
* nodes in ``keep_fp32_ops`` (LayerNormalization, Softmax, LogSoftmax by default) run in fp32:
  their inputs are cast up and their outputs cast back for fp16 consumers, as
  ``LayerNorm32`` does in the PyTorch models;
* shape arithmetic (floats computed only from shapes and constants, e.g. the attention scale)
  stays in fp32 and is cast where it meets fp16 data;
* inputs that a schema fixes to ``tensor(float)`` (e.g. Resize ``scales``) stay fp32, and ops
  whose type constraint has no float16 (e.g. Range) run in fp32;
* graph inputs and outputs keep their fp32 type: the graph casts right after its inputs and
  right before its outputs, so callers feed and read float32 whatever the precision.

Only the default ONNX domain is handled; graphs with subgraphs (If/Loop/Scan) are refused.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
DEFAULT_KEEP_FP32_OPS = frozenset({"LayerNormalization", "Softmax", "LogSoftmax"})
FP16_MAX = float(np.finfo(np.float16).max)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name, by ONNX type inference on a weight-free copy.

    Initialisers become typed graph inputs in the copy, so a multi-GB model is never serialised.
    """
    graph = model.graph
    init_infos = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                  for t in graph.initializer]
    input_names = {i.name for i in graph.input}
    inputs = list(graph.input) + [v for v in init_infos if v.name not in input_names]
    skeleton = helper.make_model(
        helper.make_graph(list(graph.node), graph.name or "graph", inputs, list(graph.output)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in list(inferred.input) + list(inferred.output) + list(inferred.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _schema(node: onnx.NodeProto, opset: int):
    if node.domain not in ("", "ai.onnx"):
        raise ValueError(f"fp16 conversion: node {node.name!r} is in domain {node.domain!r}; only "
                         "standard ONNX operators are supported")
    try:
        return onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError as exc:
        raise ValueError(f"fp16 conversion: no ONNX schema for {node.op_type} at opset "
                         f"{opset}") from exc


def _slot_types(schema, index: int, outputs: bool) -> list[str]:
    """Allowed type strings of input/output ``index`` (variadic last parameters repeat)."""
    params = schema.outputs if outputs else schema.inputs
    param = params[min(index, len(params) - 1)]
    for constraint in schema.type_constraints:
        if constraint.type_param_str == param.type_str:
            return list(constraint.allowed_type_strs)
    return [param.type_str]


def _cast_node(source: str, target: str, to: int, constant: onnx.NodeProto | None) -> onnx.NodeProto:
    """A Cast of ``source`` to ``to``, or, for a Constant, a new Constant holding the cast value."""
    if constant is not None:
        value = numpy_helper.to_array(constant.attribute[0].t)
        dtype = np.float16 if to == HALF else np.float32
        if to == HALF:
            value = np.clip(value, -FP16_MAX, FP16_MAX)
        return helper.make_node("Constant", [], [target], name=target,
                                value=numpy_helper.from_array(value.astype(dtype)))
    return helper.make_node("Cast", [source], [target], to=to, name=target)


def convert_float_to_float16(model: onnx.ModelProto,
                             keep_fp32_ops: frozenset[str] | set[str] = DEFAULT_KEEP_FP32_OPS
                             ) -> onnx.ModelProto:
    """Return a copy of ``model`` whose data path computes in float16 (see module docstring).

    Args:
        model: an fp32 ONNX model (weights may be in memory or already loaded external data).
        keep_fp32_ops: op types that always compute in fp32.

    Raises:
        ValueError: the graph has subgraphs, non-standard ops, or tensors whose type cannot be
            inferred.
    """
    opset = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("fp16 conversion: model imports no standard ONNX opset")
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"fp16 conversion: node {node.name!r} ({node.op_type}) holds a subgraph; "
                             "control flow is not supported")
    types = _elem_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)
    initializers = {t.name: t for t in graph.initializer}

    # 1. which tensors carry data and which nodes run in fp16
    data = {i.name for i in graph.input if types.get(i.name) == FLOAT}
    data |= {name for name, t in initializers.items() if t.data_type == FLOAT}
    half_node: list[bool] = []
    for node in nodes:
        schema = _schema(node, opset)
        touches = any(n in data for n in node.input if n and types.get(n) == FLOAT)
        half = touches and node.op_type not in keep_fp32_ops
        if half and node.op_type != "Cast":
            for i, name in enumerate(node.input):
                if name and types.get(name) == FLOAT:
                    allowed = _slot_types(schema, i, outputs=False)
                    if "tensor(float16)" not in allowed and allowed != ["tensor(float)"]:
                        half = False  # e.g. Range: no float16 in the standard
            for i, name in enumerate(node.output):
                if name and types.get(name) == FLOAT and \
                        "tensor(float16)" not in _slot_types(schema, i, outputs=True):
                    half = False
        for name in node.output:
            if name and name not in types:
                raise ValueError(f"fp16 conversion: cannot infer the type of {name!r} "
                                 f"({node.op_type} node {node.name!r})")
            if name and touches and types[name] == FLOAT:
                data.add(name)
        half_node.append(half)
    # An explicit upcast (Cast to float) that only feeds fp32 nodes stays an upcast: this is
    # LayerNorm32's ``x.float()`` in front of LayerNormalization.
    consumers: dict[str, list[int]] = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(k)
    outputs = {o.name for o in graph.output}
    for k, node in enumerate(nodes):
        if node.op_type == "Cast" and half_node[k] and types.get(node.output[0]) == FLOAT:
            users = consumers.get(node.output[0], [])
            if users and node.output[0] not in outputs and not any(half_node[u] for u in users):
                half_node[k] = False
    now: dict[str, int] = {i.name: types.get(i.name, 0) for i in graph.input}
    for node, half in zip(nodes, half_node):
        for name in node.output:
            if name:
                now[name] = (HALF if half else FLOAT) if types[name] == FLOAT else types[name]
        if half and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
    constants = {n.output[0]: n for n in nodes if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value"}

    # 2. graph outputs keep float32: route a half output through a final Cast
    tail = []
    for output in graph.output:
        if now.get(output.name) == HALF:
            inner = f"{output.name}__fp16"
            for node in nodes:
                node.output[:] = [inner if n == output.name else n for n in node.output]
                node.input[:] = [inner if n == output.name else n for n in node.input]
            now[inner], types[inner] = HALF, FLOAT
            tail.append(helper.make_node("Cast", [inner], [output.name], to=FLOAT,
                                         name=f"{output.name}__to_fp32"))

    # 3. insert casts where a consumer needs the other float type; note what weights must be
    needs: dict[str, set[int]] = {}
    half_uses: list[tuple[onnx.NodeProto, int, str]] = []
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node, half in zip(nodes, half_node):
        if node.op_type != "Cast":  # Cast takes any input type
            schema = _schema(node, opset)
            for i, name in enumerate(node.input):
                if not name or types.get(name) != FLOAT:
                    continue
                fixed32 = _slot_types(schema, i, outputs=False) == ["tensor(float)"]
                want = HALF if half and not fixed32 else FLOAT
                if name in initializers and name not in now:
                    needs.setdefault(name, set()).add(want)
                    if want == HALF:
                        half_uses.append((node, i, name))
                    continue
                if now.get(name, FLOAT) != want:
                    key = (name, want)
                    if key not in casts:
                        casts[key] = f"{name}__to_{'fp16' if want == HALF else 'fp32'}"
                        new_nodes.append(_cast_node(name, casts[key], want, constants.get(name)))
                    node.input[i] = casts[key]
        new_nodes.append(node)
    new_nodes += tail
    used = {name for node in new_nodes for name in node.input} | {o.name for o in graph.output}
    graph.ClearField("node")  # Constants replaced by their fp16 copies are dropped
    graph.node.extend(n for n in new_nodes if n.op_type != "Constant" or n.output[0] in used)

    # 4. weights: float16 for fp16 consumers (clipped to the fp16 range); a weight that fp32
    # consumers read too keeps its fp32 tensor and gains a float16 copy
    listed = {i.name for i in graph.input}
    renamed: dict[str, str] = {}
    clipped = 0
    for name, wanted in needs.items():
        if HALF not in wanted:
            continue
        tensor = initializers[name]
        values = numpy_helper.to_array(tensor)
        clipped += int(np.count_nonzero(np.abs(values) > FP16_MAX))
        values = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
        if FLOAT in wanted or name in listed:
            renamed[name] = f"{name}__fp16"
            graph.initializer.append(numpy_helper.from_array(values, renamed[name]))
        else:
            tensor.CopyFrom(numpy_helper.from_array(values, name))
    for node, i, name in half_uses:
        node.input[i] = renamed.get(name, name)
    if clipped:
        log.warning("fp16 conversion: %d weight values outside the fp16 range were clipped", clipped)
    graph.ClearField("value_info")  # stale fp32 annotations; runtimes infer them again
    return out


def float16_report(model: onnx.ModelProto) -> dict[str, int]:
    """Counts for the export log: weights per type and fp32-kept nodes fed through casts.

    Returns ``{"fp16_weights", "fp32_weights", "fp32_nodes_with_cast_inputs", "casts"}``.
    """
    produced_by_cast = {o for n in model.graph.node if n.op_type == "Cast" for o in n.output}
    return {
        "fp16_weights": sum(t.data_type == HALF for t in model.graph.initializer),
        "fp32_weights": sum(t.data_type == FLOAT for t in model.graph.initializer),
        "fp32_nodes_with_cast_inputs": sum(
            n.op_type in DEFAULT_KEEP_FP32_OPS and bool(n.input) and n.input[0] in produced_by_cast
            for n in model.graph.node),
        "casts": sum(n.op_type == "Cast" for n in model.graph.node),
    }
