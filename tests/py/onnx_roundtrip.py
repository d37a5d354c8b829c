"""Writes, or compares against, a model made with the `onnx` Python package.

    python3 tests/py/onnx_roundtrip.py write MODEL.onnx
    python3 tests/py/onnx_roundtrip.py compare ORIGINAL.onnx REWRITTEN.onnx

The model uses many parts of the IR (doc strings, value_info, metadata, typed and raw tensor
data, int64/float/string attributes, a subgraph, a function, dim_params, external-free
initializers) so that a reader/writer that drops a field is caught.
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    w = numpy_helper.from_array(np.arange(9, dtype=np.float32).reshape(3, 3), "w")
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0])  # typed float_data
    k = helper.make_tensor("k", TensorProto.INT64, [2], [1, -3])
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["mm"], ["then_out"], name="then_relu")], "then",
        [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", 3])])
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["mm"], ["else_out"], name="else_neg")], "else",
        [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", 3])])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul", doc_string="x times w"),
        helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Add", ["branch", "b"], ["added"], name="add"),
        helper.make_node("LeakyRelu", ["added"], ["y"], name="leaky", alpha=0.25),
    ]
    graph = helper.make_graph(nodes, "roundtrip", [x, cond], [y], [w, b, k], doc_string="a graph")
    graph.value_info.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, ["N", 3]))
    fn = helper.make_function("densa.test", "Twice", ["a"], ["o"],
                              [helper.make_node("Add", ["a", "a"], ["o"])],
                              [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("densa.test", 1)],
                              producer_name="onnx-python", doc_string="round trip", functions=[fn])
    model.ir_version = 8
    helper.set_model_props(model, {"author": "densa tests", "task": "roundtrip"})
    onnx.checker.check_model(model, full_check=True)
    return model


def clear_explicit_defaults(msg):
    """ONNX's .proto is proto2: a scalar set to its default (e.g. `domain: ""`) is "present".
    densa's messages follow proto3 and do not write default scalars; ONNX gives both the same
    meaning. Clear such fields (recursively) so that the comparison sees meaning, not
    presence."""
    from google.protobuf.descriptor import FieldDescriptor
    for field, value in list(msg.ListFields()):
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for v in value:
                    clear_explicit_defaults(v)
            else:
                clear_explicit_defaults(value)
        elif not repeated and value == field.default_value:
            msg.ClearField(field.name)


def main():
    cmd = sys.argv[1]
    if cmd == "write":
        onnx.save(build(), sys.argv[2])
    elif cmd == "compare":
        a, b = onnx.load(sys.argv[2]), onnx.load(sys.argv[3])
        onnx.checker.check_model(b, full_check=True)
        clear_explicit_defaults(a)
        clear_explicit_defaults(b)
        if a != b:
            print("models differ:\n--- original\n", a, "\n--- rewritten\n", b)
            sys.exit(1)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
