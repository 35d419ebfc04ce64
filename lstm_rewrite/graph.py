"""Graph: read one level of a Keras functional model into a networkx.DiGraph of layer *calls*.

A node is one call of a layer (a shared layer called twice is two nodes), keyed ``"<layer>#<k>"``
where k is the call's index among the calls that belong to this model. Node data:

- ``layer``: the layer (or Keras 3 operation) object called;
- ``call_index``: k; ``args`` / ``kwargs``: the recorded call arguments, holding the original
  Keras tensors; ``outputs``: the flat list of tensors the call produced;
- ``is_input``: True for an ``InputLayer``; ``order``: the sort key `walk` uses.

An edge u -> v means v consumes a tensor u produced. ``graph.graph`` holds ``inputs`` (the
model's input structure), ``outputs`` (its flat outputs) and ``producer`` (id(tensor) -> (node,
position)). Nested models stay single nodes; the rewrite walks them recursively.
"""

from __future__ import annotations

import networkx as nx

from .errors import UnsupportedModelError


def build_graph(functional, backend) -> nx.DiGraph:
    """Read ``functional`` (a functional model of either flavour) into a DiGraph of layer calls.

    Example:
        >>> graph = build_graph(model, backends.for_model(model))
        >>> [graph.nodes[n]["layer"].name for n in nx.topological_sort(graph)]
        ['tokens', 'embedding', 'encoder', 'head']
    """
    graph = nx.DiGraph()
    records = list(backend.graph_nodes(functional))
    layer_position = {id(layer): k for k, layer in enumerate(functional.layers)}
    own_nodes = {id(node) for node, *_ in records}
    producer = {}
    for node, layer, args, kwargs, outputs, is_input in records:
        # The call index counts only this model's calls of the layer, in the layer's own order.
        own_calls = [n for n in backend.inbound_nodes(layer) if id(n) in own_nodes]
        call_index = next((k for k, n in enumerate(own_calls) if n is node), 0)
        key = f"{layer.name}#{call_index}"
        graph.add_node(
            key, layer=layer, call_index=call_index, args=args, kwargs=kwargs, outputs=outputs,
            is_input=is_input, order=(layer_position.get(id(layer), len(layer_position)), call_index, key),
        )
        for position, tensor in enumerate(outputs):
            producer.setdefault(id(tensor), (key, position))
    for key, data in graph.nodes(data=True):
        for tensor in input_tensors(data, backend):
            if id(tensor) not in producer:
                raise UnsupportedModelError(
                    f"Layer {data['layer'].name!r} ({type(data['layer']).__name__}) consumes a tensor that no "
                    f"layer of model {functional.name!r} produces; the graph cannot be rebuilt. Make sure every "
                    f"input of the model is a keras.Input. Received tensor: {tensor!r}"
                )
            graph.add_edge(producer[id(tensor)][0], key)
    graph.graph.update(
        inputs=backend.inputs_structure(functional),
        outputs=backend.outputs_of(functional),
        producer=producer,
        name=functional.name,
    )
    check_graph(graph)
    return graph


def walk(graph: nx.DiGraph) -> list:
    """Node keys in topological order; ties broken by the model's layer order, then call index,
    so that the rewrite, and the order of the outputs it adds, are deterministic."""
    return list(nx.lexicographical_topological_sort(graph, key=lambda key: graph.nodes[key]["order"]))


def input_tensors(node_data, backend) -> list:
    """The Keras tensors a call consumes, from its positional and keyword arguments."""
    flat = backend.flatten((list(node_data["args"]), dict(node_data["kwargs"])))
    return [t for t in flat if backend.is_tensor(t)]


def check_graph(graph: nx.DiGraph) -> None:
    """Lint a call graph: acyclic, every edge's ends present, one node per key, outputs produced.

    Raises:
        UnsupportedModelError: naming the model and what is wrong.
    """
    name = graph.graph.get("name", "?")
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise UnsupportedModelError(f"The call graph of model {name!r} has a cycle through {cycle}; it cannot be rewritten.")
    for u, v in graph.edges:
        if "layer" not in graph.nodes[u] or "layer" not in graph.nodes[v]:
            raise UnsupportedModelError(f"The call graph of model {name!r} has a dangling edge {u} -> {v}.")
    producer = graph.graph.get("producer", {})
    for tensor in graph.graph.get("outputs", []):
        if id(tensor) not in producer:
            raise UnsupportedModelError(f"An output of model {name!r} is produced by no layer of it: {tensor!r}.")
