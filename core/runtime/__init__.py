"""The machine a run uses: model resolution and loading, device placement, memory limits and checks.
"""
