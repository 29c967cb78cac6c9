//! Crash points named after protocol steps (`write::after-a5`,
//! `parity::after-b11`), compiled in only with the `failpoints` feature.
//!
//! `FAILPOINTS="write::after-a5=return(abort)"` aborts the process there
//! (a crash, not a clean exit). `return(pause)` writes a marker file
//! `failpoint-hit` into the IOM's directory and waits until it is removed,
//! so a test can kill another process at exactly that moment.

/// Where a crash point is hit: the IOM (for the log) and its directory
/// (for the `failpoint-hit` marker). The node implements it, and so does
/// [`Site`], which code away from the node (a checkpoint's writer on the
/// blocking pool) carries.
pub trait At {
    fn iom(&self) -> common::IomId;
    fn dir(&self) -> &std::path::Path;
}

/// A crash point's place, owned.
#[derive(Clone, Debug)]
pub struct Site {
    pub id: common::IomId,
    pub dir: std::path::PathBuf,
}

impl At for Site {
    fn iom(&self) -> common::IomId {
        self.id
    }
    fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl<T: At + ?Sized> At for std::sync::Arc<T> {
    fn iom(&self) -> common::IomId {
        (**self).iom()
    }
    fn dir(&self) -> &std::path::Path {
        (**self).dir()
    }
}

/// Marks a crash point.
#[macro_export]
macro_rules! crash_point {
    ($iom:expr, $name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some(arg) = (|| {
                fail::fail_point!($name, |a| a);
                None::<String>
            })() {
                $crate::failpoint::hit($iom, $name, &arg).await;
            }
        }
        #[cfg(not(feature = "failpoints"))]
        {
            let _ = &$iom;
        }
    };
}

#[cfg(feature = "failpoints")]
pub async fn hit<T: At + ?Sized>(at: &T, name: &str, arg: &str) {
    let marker = at.dir().join("failpoint-hit");
    tracing::warn!(iom = at.iom().0, failpoint = name, action = arg, "failpoint hit");
    match arg {
        "pause" => {
            let _ = std::fs::write(&marker, name);
            while marker.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        _ => {
            let _ = std::fs::write(&marker, name);
            eprintln!("iom-server {}: failpoint {name}: abort", at.iom().0);
            std::process::abort();
        }
    }
}

/// Marks a crash point in non-async code (a pause blocks the thread).
#[macro_export]
macro_rules! crash_point_sync {
    ($iom:expr, $name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some(arg) = (|| {
                fail::fail_point!($name, |a| a);
                None::<String>
            })() {
                $crate::failpoint::hit_sync($iom, $name, &arg);
            }
        }
        #[cfg(not(feature = "failpoints"))]
        {
            let _ = &$iom;
        }
    };
}

#[cfg(feature = "failpoints")]
pub fn hit_sync<T: At + ?Sized>(at: &T, name: &str, arg: &str) {
    let marker = at.dir().join("failpoint-hit");
    tracing::warn!(iom = at.iom().0, failpoint = name, action = arg, "failpoint hit");
    let _ = std::fs::write(&marker, name);
    if arg == "pause" {
        while marker.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    } else {
        eprintln!("iom-server {}: failpoint {name}: abort", at.iom().0);
        std::process::abort();
    }
}
