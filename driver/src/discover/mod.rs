//! Discovery: what network hardware the node has (NICs, RDMA devices, GPUs) and the PCIe/NUMA topology between them.

pub mod inventory;
pub mod pci;
pub mod topology;
