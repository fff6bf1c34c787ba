"""What the host asks and subscribers are told, named once.  A kernel request decodes to
a Verb (or to None: an operation the agent does not know), the engine decides on it, and
the frontend's records and the subscribers' lines carry it.  Each wire spells it its
own way (the kernel's operation numbers, the frontend's codes, the subscribers' words)
and translates it only where it encodes and decodes."""

import enum


class Verb(enum.Enum):
    CHECK = "CHECK"
    FREEZE = "FREEZE"
    THAW = "THAW"
