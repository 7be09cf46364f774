"""collectives-report: throughput per dollar of the library's plans on cloud clusters.

prices (the price book), simulator (all-reduce and step times), calibration (its constants,
fitted on testbed runs, and its held-out error), advisor (reducers: how many, which type),
render (report.html, report.md), cli (the console script). docs/report.md has worked examples.
"""
