"""Pipeline schedules as data (1F1B, ZB-H1, DualPipeV, DualPipe), their checks, a simulator and its pictures."""

from dsv3c.schedules.actions import Layout, Op, Schedule, ScheduleError, layout_of, parse
from dsv3c.schedules.build import KINDS, build, validate

__all__ = ["KINDS", "Layout", "Op", "Schedule", "ScheduleError", "build", "layout_of", "parse", "validate"]
