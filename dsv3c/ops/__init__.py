"""The dsv3 op vocabulary: every custom op of the IR with its record (reference, fake, autograd, cost, stage, lowering).

Each op is a `torch.library.custom_op` that stays one node through torch.export. Its reference implementation
lives in its family module (or, shared, in `dsv3c.ops.ref` and `dsv3c.ops.fp8` for the FP8 math); the fake
implementation gives shapes and dtypes only, so the 671B model can be captured on meta tensors. One module per
op family declares each op and its record (`dsv3c.ops.record.define`); importing this package imports every
module in it, so a new family is a new module here and nothing else lists it. Each op is `dsv3c.ops.<name>`
(and `torch.ops.dsv3.<name>`), its record `RECORDS[name]`. This package is a leaf: it imports nothing else of
dsv3c.
"""

import importlib
import pkgutil

from dsv3c.ops.record import NAMESPACE, RECORDS, Cost, Lowering, NotLowered, check_complete, op_name, record_of

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

check_complete()
globals().update({name: record.op for name, record in RECORDS.items()})  # each op as dsv3c.ops.<name>

__all__ = ["NAMESPACE", "RECORDS", "Cost", "Lowering", "NotLowered", "check_complete", "op_name", "record_of",
           *RECORDS]
