"""bench_backward's attribution of a traced step's operations to model parts (its --profile table)."""

import pytest

from experiments import bench_backward


@pytest.mark.parametrize('op_name, part', [
    ('jit(step)/jvp(RetinaNet)/head/cls_net/conv_1/conv_general_dilated', 'head/cls_net fwd'),
    ('jit(step)/transpose(jvp(RetinaNet))/head/box_net/out/transpose(jvp())/conv_general_dilated',
     'head/box_net bwd'),
    ('jit(step)/jvp(RetinaNet)/backbone/layer2_1/conv2/conv_general_dilated', 'backbone/layer2 fwd'),
    ('jit(step)/transpose(jvp(RetinaNet))/backbone/jit(_where)/select_n', 'backbone bwd'),
    ('jit(step)/jvp(RetinaNet)/fpn/output_3/conv_general_dilated', 'fpn/output fwd'),
    ('jit(step)/jvp()/while/body/closed_call/div', 'step outside the model: while loop'),
    ('jit(step)/jvp()/exp', 'step outside the model: exp'),
    ('', '(no metadata: layout copies, iotas)'),
])
def test_model_part(op_name, part):
  assert bench_backward._model_part(op_name) == part
