"""Stand-ins for the external payment provider and fulfillment warehouse, run as their own process.

Importing the package has no side effects, so the shop can reuse `sandbox.signing` in its tests.
"""
