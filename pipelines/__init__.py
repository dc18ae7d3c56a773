"""Labelling tasks, one module each: a list of stages over depthray's job package.

`depthray run CONFIG` runs the one the config's `pipeline` names (`depth` by default);
`depthray run CONFIG --pipeline NAME_OR_FILE` another; `python pipelines/<name>.py CONFIG`
(and so `ray job submit -- python pipelines/<name>.py CONFIG`) runs a module directly.
To add a task, copy depth.py and change its list.
"""
