"""The pass manager and its instrumentation: run, verify, time, dump, print and reproduce."""
