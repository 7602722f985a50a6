//! Routing for `IA2_HEAP=compartment`: which heap serves a call, decided by
//! the caller's return address. A sorted table of the text ranges of every
//! compartment object; anything else (ld.so, libc, other system objects, the
//! shim, unknown code) is served by the shared heap 0.
//!
//! The table is immutable once published; a `dlopen` publishes a new one
//! ([`crate::alloc::refresh_routes`]) and the old one is leaked, because
//! another thread may still be reading it.

use crate::objects::{LoadedObject, ObjectKind, Range};
use core::sync::atomic::{AtomicPtr, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub start: usize,
    pub end: usize,
    /// The heap (= compartment number) that serves calls from this range.
    pub heap: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(pub Vec<Route>);

impl Routes {
    /// Executable segments of application objects that have a compartment.
    /// System objects stay on the shared heap even when strict mode puts
    /// them in a compartment: their allocations are loader and libc state.
    pub fn build(objects: &[LoadedObject], compartment_of: &[Option<u8>]) -> Routes {
        Routes::from_objects(objects.iter().zip(compartment_of).map(|(o, c)| {
            (
                o.kind,
                o.segments.iter().map(|s| (s.range, s.executable())),
                *c,
            )
        }))
    }

    /// [`Routes::build`] over `(kind, segments as (range, executable), compartment)`.
    pub fn from_objects<I, S>(objects: I) -> Routes
    where
        I: IntoIterator<Item = (ObjectKind, S, Option<u8>)>,
        S: IntoIterator<Item = (Range, bool)>,
    {
        let mut v = Vec::new();
        for (kind, segments, c) in objects {
            let Some(c) = c else { continue };
            if !matches!(kind, ObjectKind::Main | ObjectKind::Application) {
                continue;
            }
            for (range, exec) in segments {
                if exec {
                    let r = range.pages_out();
                    v.push(Route {
                        start: r.start,
                        end: r.end,
                        heap: c,
                    });
                }
            }
        }
        v.sort_by_key(|r| r.start);
        Routes(v)
    }

    /// The heap for a caller at `addr`: its compartment, else 0 (shared).
    #[inline]
    pub fn heap_of(&self, addr: usize) -> usize {
        let i = self.0.partition_point(|r| r.end <= addr);
        match self.0.get(i) {
            Some(r) if r.start <= addr => r.heap as usize,
            _ => 0,
        }
    }
}

/// The published table: the pointer on a page of its own and the table in
/// the sealed heap, both on the shim key once hardened ([`harden`]): a
/// compartment that rewrote a route would have another compartment's
/// allocations served from its own heap (`tests/escapes.rs`, `route-table`).
#[repr(C, align(4096))]
struct Published(AtomicPtr<Routes>);
static ROUTES: Published = Published(AtomicPtr::new(core::ptr::null_mut()));

/// Publish a new table.
pub fn install(r: Routes) {
    crate::sealed::with_sealed(|| {
        let p = Box::into_raw(Box::new(r.clone()));
        // The old table is leaked on purpose: readers hold no lock.
        ROUTES.0.swap(p, Ordering::AcqRel);
    });
}

/// Put the table's pointer on the shim key (`IA2_HARDEN=on`).
pub fn harden(key: u32) {
    crate::pku::seal_static(&ROUTES, key, "heap route table");
}

/// The heap for a caller at `addr` under the published table.
#[inline]
pub fn heap_for(addr: usize) -> usize {
    let p = ROUTES.0.load(Ordering::Acquire);
    if p.is_null() {
        return 0;
    }
    // SAFETY: published tables are never freed.
    unsafe { &*p }.heap_of(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Obj = (ObjectKind, Vec<(Range, bool)>, Option<u8>);

    fn obj(kind: ObjectKind, segs: &[(usize, usize, bool)], c: Option<u8>) -> Obj {
        (
            kind,
            segs.iter()
                .map(|&(s, e, x)| (Range::new(s, e), x))
                .collect(),
            c,
        )
    }

    #[test]
    fn routes_text_of_compartment_objects_only() {
        // libc in compartment 3 (strict mode) and an unassigned application object.
        let r = Routes::from_objects([
            obj(
                ObjectKind::Main,
                &[
                    (0x1000, 0x1800, false),
                    (0x2000, 0x2f00, true),
                    (0x3000, 0x3100, false),
                ],
                Some(1),
            ),
            obj(ObjectKind::System, &[(0x9000, 0xa000, true)], Some(3)),
            obj(ObjectKind::Application, &[(0x5000, 0x6000, true)], Some(2)),
            obj(ObjectKind::Application, &[(0x7000, 0x8000, true)], None),
        ]);
        assert_eq!(
            r.0,
            vec![
                Route {
                    start: 0x2000,
                    end: 0x3000,
                    heap: 1
                },
                Route {
                    start: 0x5000,
                    end: 0x6000,
                    heap: 2
                }
            ]
        );
        assert_eq!(r.heap_of(0x1fff), 0);
        assert_eq!(r.heap_of(0x2000), 1);
        assert_eq!(r.heap_of(0x2f80), 1, "page-rounded");
        assert_eq!(r.heap_of(0x3000), 0, "data is not text");
        assert_eq!(r.heap_of(0x5abc), 2);
        assert_eq!(r.heap_of(0x7abc), 0, "no compartment");
        assert_eq!(r.heap_of(0x9abc), 0, "system code uses the shared heap");
        assert_eq!(Routes::default().heap_of(0x2000), 0);
    }
}
