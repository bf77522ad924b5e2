//! The layer-source order of a composed image (README, "Composition"): after the base image's
//! own layers come the static layers in configuration order, then the IDE image, the
//! supervisor image, each IDE layer image, and last the content layers. The environment rules
//! apply in the same order, so it decides which `GITPOD_ENV_SET_*` wins as well.

/// One source of added layers, in composition order. Generic over how the caller names static
/// layers (`S`), images (`I`) and content layers (`C`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSource<S, I, C> {
    /// A static layer of the facade's configuration.
    Static(S),
    /// The spec's `ide_ref`.
    Ide(I),
    /// The spec's `supervisor_ref`.
    Supervisor(I),
    /// One of the spec's `ide_layer_ref`s.
    IdeLayer(I),
    /// One of the spec's content layers.
    Content(C),
}

impl<S, I, C> LayerSource<S, I, C> {
    /// How history entries and errors name the source.
    pub fn role(&self) -> &'static str {
        match self {
            LayerSource::Static(_) => "static layer",
            LayerSource::Ide(_) => "ide",
            LayerSource::Supervisor(_) => "supervisor",
            LayerSource::IdeLayer(_) => "ide layer",
            LayerSource::Content(_) => "content layer",
        }
    }
}

/// The sources of added layers, in the order their layers are appended.
pub fn layer_sources<S, I, C>(
    statics: impl IntoIterator<Item = S>,
    ide: Option<I>,
    supervisor: Option<I>,
    ide_layers: impl IntoIterator<Item = I>,
    content: impl IntoIterator<Item = C>,
) -> Vec<LayerSource<S, I, C>> {
    let mut out: Vec<LayerSource<S, I, C>> = statics.into_iter().map(LayerSource::Static).collect();
    out.extend(ide.map(LayerSource::Ide));
    out.extend(supervisor.map(LayerSource::Supervisor));
    out.extend(ide_layers.into_iter().map(LayerSource::IdeLayer));
    out.extend(content.into_iter().map(LayerSource::Content));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statics_then_ide_supervisor_ide_layers_then_content() {
        let got = layer_sources(["s1", "s2"], Some("ide"), Some("sup"), ["l1", "l2"], ["c1"]);
        assert_eq!(
            got,
            vec![
                LayerSource::Static("s1"),
                LayerSource::Static("s2"),
                LayerSource::Ide("ide"),
                LayerSource::Supervisor("sup"),
                LayerSource::IdeLayer("l1"),
                LayerSource::IdeLayer("l2"),
                LayerSource::Content("c1"),
            ]
        );
        let roles: Vec<_> = got.iter().map(LayerSource::role).collect();
        assert_eq!(
            roles,
            ["static layer", "static layer", "ide", "supervisor", "ide layer", "ide layer", "content layer"]
        );
    }

    #[test]
    fn absent_parts_are_skipped() {
        let got = layer_sources(Vec::<u8>::new(), None::<&str>, Some("sup"), [], [7u32]);
        assert_eq!(got, vec![LayerSource::Supervisor("sup"), LayerSource::Content(7)]);
    }
}
