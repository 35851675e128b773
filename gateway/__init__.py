"""The infermesh gateway: an OpenAI-compatible front for the fleet's workers, with SLAs, limits and billing.

A request on a hot route (gateway/app.py, ``Gateway.handle``) goes through admission
(admission.py), then the upstream call (proxy.py: routing, retries, relay), then the meter
(meter.py). Modules stand on floors and import only sideways or down, never up, with no circle
(tests/test_imports.py holds the same table and checks every import, lazy and TYPE_CHECKING ones too):

====  ===============================================================================
7     ``__main__`` (the process: uvicorn, the listener)
6     ``app`` (the request path's wiring, background loops, FastAPI routes)
5     ``proxy`` (the upstream call: routing, retries before the first byte, relay)
4     ``meter`` (ledger rows, settling what admission charged, counts)
3     ``admission``, ``probes``
2     ``door``, ``risk``, ``backends`` (the state backends' Protocols)
1     ``errors``, ``router``, ``state/`` (the backends themselves)
0     ``wire``, ``channel``, ``keys``, ``ledger``, ``limits``, ``metrics``, ``money``, ``overload``,
      ``redact``, ``sla``, ``sli``, ``logsafe``, ``listener``: one concept each, nothing of the gateway's
====  ===============================================================================
"""
