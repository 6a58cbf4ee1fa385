//! Networked sync engine of quiverdb.
