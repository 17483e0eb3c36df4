"""apparate.control: the controller's side of early-exit serving, on numpy alone.

The feedback window the serving side writes (``feedback``), the exit policy and latency model
decisions are judged by (``policy``, ``latency``), the threshold tuner and ramp adjuster
(``tuner``, ``adjuster``), the first active set (``initial``), the controller that combines them
(``controller``) and the process it runs in beside serving (``process``). Nothing here imports
torch or knows about models and devices, so the controller process starts without either.
"""
