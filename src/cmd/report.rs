//! `fp8train report`: a run folder's summary and loss curve.

use crate::cli::ReportArgs;
use crate::train::report;

pub fn report_cmd(a: &ReportArgs) -> Result<(), String> {
    let path = report::write_plot(&a.run)?;
    println!("{}", report::summary(&a.run)?);
    println!("loss curve: {}", path.display());
    Ok(())
}
