"""The one cost model: op facts per block (facts, figures), the pricing module (price, calibration, constants),
the training and inference costs (train, inference), and the priced plan for plan.json (plan_cost, tables)."""
