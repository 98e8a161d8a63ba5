"""torch.compile: the lookup is one graph with no break, and compiled training steps
update the rows exactly as eager ones do."""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from tests.helpers import collection, random_kjt, weights

METHODS = rectables.list_tables()
FEATS = ["a", "b", "c"]


@pytest.mark.parametrize("method", METHODS)
def test_no_graph_break_in_the_lookup(method):
    ebc = collection(method, FEATS)
    explained = torch._dynamo.explain(lambda k: ebc(k).values().square().sum())(random_kjt(FEATS, 16, 3))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer, weighted", [("sgd", False), ("adam", True), ("rowwise_adagrad", False)])
def test_compiled_steps_update_rows_as_eager_ones(method, optimizer, weighted):
    def make():
        torch.manual_seed(0)
        return rectables.EmbeddingBagCollection(list(collection(method, FEATS).tables),
                                                rectables.SparseOptimizer(optimizer, lr=0.1), is_weighted=weighted)
    eager, compiled = make(), make()
    assert torch.equal(weights(eager), weights(compiled))
    step = torch.compile(lambda k: compiled(k).values().square().sum(), backend="aot_eager")
    for i in range(3):
        kjt = random_kjt(FEATS, 8, 1 + i, gen=torch.Generator().manual_seed(i))  # shapes change: recompiles
        if weighted:
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=kjt.values(), lengths=kjt.lengths(),
                                                      weights=torch.rand(kjt.values().numel()))
        eager(kjt).values().square().sum().backward()
        step(kjt).backward()
        torch.testing.assert_close(weights(compiled), weights(eager), rtol=1e-6, atol=1e-7)
