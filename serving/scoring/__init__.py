"""Offline batch scoring (`kiln score`): stored images -> Parquet shards, exactly once.

Modules: inputs (what to score), model (the verified backend holder), local_engine and ray_engine
(how), writer (the Parquet schema), ledger + shards (exactly-once commits), summary (progress and
totals), job (the whole job). Nothing is imported here so `import serving.scoring` stays cheap.
"""
