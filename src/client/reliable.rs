//! Sans-IO exactly-once, in-order delivery across a data channel and Matrix (being built).
