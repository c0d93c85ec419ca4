"""Export stage: conv-BN folding, ONNX export, FP16/INT8 variants, TensorRT engines, the parity
gate and the model-repository writer. Importing this package imports nothing heavy; the CLI
entry points are `export.cli.add_arguments` / `export.cli.run`, the library one
`export.pipeline.export_run`.
"""
