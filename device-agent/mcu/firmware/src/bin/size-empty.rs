//! Footprint baseline: cortex-m-rt and panic-halt with an empty loop, built
//! the same way as the other images. The footprint script subtracts it, so
//! the figures are what mqseal adds to a firmware.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use panic_halt as _;

#[entry]
fn main() -> ! {
    mqseal_mcu_firmware::halt()
}
