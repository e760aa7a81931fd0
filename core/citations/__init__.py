"""From what the memory holds back to the passages an answer came from: scores and source locations.
"""
