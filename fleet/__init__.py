"""The declared service and how it is carried out: the spec, the plan, the carriers.

Modules stand on floors and import only sideways or down, never up, with no circle
(tests/test_imports.py holds the same table and checks every import, lazy and TYPE_CHECKING ones too).
Nothing here imports the CLI (infermesh_cli/, on top); the gateway imports the floors up to the plan.

====  ===============================================================================
8     ``local_apply`` (the local stack following its stack file)
7     ``components/`` (Pulumi), ``local`` (the local stack): the carriers
6     ``policy``, ``launch``, ``inventory``, ``ansible_run``, ``marketplaces/``, ``ci``
5     ``plan``
4     ``routing`` (the gateway's routing config, from the effective spec)
3     ``failover`` (the effective spec: drained providers applied, computed once, passed on)
2     ``capacity``, ``channel``, ``mesh_keys``, ``stackfile``, ``alerts``, ``canary``: pure, one concept each
1     ``spec`` (the schema), ``paths``
0     ``project``, ``kinds`` (the table of provider kinds), ``prometheus`` (reading /metrics text)
====  ===============================================================================
"""
