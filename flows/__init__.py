"""Prefect flows for cellseg: orchestration only; every task calls one cellseg library function."""
