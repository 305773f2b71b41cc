"""The dd-compile stages: prepare, export, quantize, build, validate, time, report, publish.

`stages.run` chains them over one `CompileContext`; each stage is usable alone from Python.
"""
