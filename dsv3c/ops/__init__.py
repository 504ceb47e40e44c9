"""The dsv3 op vocabulary: every custom op of the IR with its record (reference, fake, autograd, cost, lowering).

Each op is a `torch.library.custom_op` that stays one node through torch.export. Its reference implementation
lives in `dsv3c.ops.ref` (or `dsv3c.ops.fp8` for the FP8 math); the fake implementation gives shapes and
dtypes only, so the 671B model can be captured on meta tensors. One module per op family declares each op
and its record (`dsv3c.ops.record.define`). This package is a leaf: it imports nothing else of dsv3c.
"""

from dsv3c.ops.attention import latent_attention, mla_attention
from dsv3c.ops.ep import ep_combine, ep_dispatch, ep_experts, ep_experts_fp8
from dsv3c.ops.norm import rms_norm, rope, swiglu
from dsv3c.ops.quant import act_quant, fp8_gemm, fp8_linear
from dsv3c.ops.record import NAMESPACE, RECORDS, Cost, Lowering, NotLowered, check_complete, op_name, record_of
from dsv3c.ops.routing import moe_experts, moe_experts_fp8, moe_experts_fp8_train, moe_gate

check_complete()

__all__ = [
    "NAMESPACE", "RECORDS", "Cost", "Lowering", "NotLowered", "act_quant", "check_complete", "ep_combine", "ep_dispatch",
    "ep_experts", "ep_experts_fp8", "fp8_gemm",
    "fp8_linear", "latent_attention", "mla_attention", "moe_experts", "moe_experts_fp8", "moe_experts_fp8_train",
    "moe_gate", "op_name", "record_of", "rms_norm", "rope", "swiglu",
]
