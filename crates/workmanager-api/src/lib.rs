pub mod pb {
    pub mod io {
        pub mod cloudevents {
            pub mod v1 {
                tonic::include_proto!("io.cloudevents.v1");
                include!(concat!(env!("OUT_DIR"), "/io.cloudevents.v1.serde.rs"));
            }
        }
    }
    pub mod virtufin {
        tonic::include_proto!("virtufin");
        include!(concat!(env!("OUT_DIR"), "/virtufin.serde.rs"));
    }
    pub use virtufin::*;
    pub const DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/workmanager_descriptor.bin"));
}
