"""The artefact contract: what `kiln export` writes and `kiln serve` / `kiln score` read.

`kiln.json` manifest types and their JSON schema checks, the model repository's layout, atomic
publishing, the Triton `config.pbtxt`, and version policies. Imports nothing else of serving
(only serving.errors), so export can depend on it without pulling in the server.
"""
