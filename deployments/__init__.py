"""Prefect deployments of the cellseg flows: prefect.yaml for work pools, serve.py for one machine."""
