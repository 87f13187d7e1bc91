"""Every benchmark row: the Jaccard loss over the full volume, then each conv shape and upsampling block of Seg3DNet
(base and wide), each backend side by side (grouped per shape, dtype and direction in pytest-benchmark's table)."""
import pytest

import harness
import shapes

ROWS = shapes.all_rows()


@pytest.mark.parametrize("case,dtype,direction,backend", ROWS, ids=[shapes.row_id(r) for r in ROWS])
def test_op(benchmark, device, ceilings, results, case, dtype, direction, backend):
    op = {shapes.JaccardCase: "jaccard_loss", shapes.UpconvCase: "upconv_prelu_add"}.get(type(case), "conv3d_prelu")
    harness.run_row(benchmark, op, case, dtype, direction, backend, device, ceilings, results)
