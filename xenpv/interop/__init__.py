"""`xenpv interop`: the mixed-page-size interop matrix (docs/granule-extension.md).

- `matrix`: the cells (guest page x backend page x extension x device x feature profile), sans-IO
- `worker`: the guest process that runs a guest's cells (attach, verify, measure)
- `runner`: the cluster (backend domains via `xenpv.toolstack.cluster.launch`, guests and devices)
- `verdict`: a worker's observations → a cell's JSON record; the 64 KiB speed-ups
- `report`: the terminal table and the self-contained HTML report
"""
