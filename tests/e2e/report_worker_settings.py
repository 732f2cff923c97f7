"""Settings for the bulk worker in the report time-limit tests: production settings plus fault kinds.

The worker loads this module through DJANGO_SETTINGS_MODULE, so the misbehaving kinds
(tests/reports/fault_kinds.py) exist only in that test process; project settings never name them.
"""

from config.settings.base import *  # noqa: F403
from config.settings.base import REPORT_KINDS

REPORT_KINDS = {
    **REPORT_KINDS,
    "sleeps_past_soft_limit": "tests.reports.fault_kinds.sleeps_past_soft_limit",
    "ignores_soft_limit": "tests.reports.fault_kinds.ignores_soft_limit",
}
