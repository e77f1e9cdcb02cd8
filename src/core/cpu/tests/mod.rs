//! Tests that run assembled guest code on a Cpu.
