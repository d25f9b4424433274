"""The cutover: move the proxy's traffic from the active backend set to another one, with no
client error and no lost acknowledged write (design.md, "Cutover").

- machine: the state machine (`Cutover`), its steps and results, and the `DataPlane` and
  `Control` protocols it drives (the order of operations is written down there);
- preflight: the facts the preflight gathers and the report built from them;
- physical: `PhysicalControl`, the database side for a standby target;
- logical: `LogicalControl`, the same for a logical subscriber (ops.migrate).
"""
