"""The gateway's local MQTT broker: a mosquitto child process, configured, watched, restarted.

Where this sits: in front of the data path. Vehicle devices publish to this broker; the MQTT
sensors subscribe with persistent QoS 1 sessions and acknowledge only after the journal
committed (DESIGN.md I1), so between publish and commit a message lives in the broker, which
saves it to disk (``autosave_interval_s``, and always on a clean stop). `MosquittoLauncher`
(launcher.py) is the plain logic; `BrokerActor` (actor.py) is its thin supervised shell.
"""
