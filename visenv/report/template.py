"""The report page's skeleton: inline CSS and the picture check script (kept in Python so it ships
with the package without package-data settings)."""

from string import Template

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 14px/1.4 sans-serif; margin: 0 2em 3em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
thead th { background: #f2f4f8; position: sticky; top: 0; }
tbody th { text-align: left; font-weight: normal; }
tr.overall th, tr.overall td { font-weight: bold; background: #fafafa; }
tr.modality th, tr.modality td { background: #f6f8fc; }
td.na { color: #aaa; }
.note { color: #555; max-width: 60em; }
svg.curves polyline { fill: none; stroke-width: 1.5; }
.charts { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
#broken-images { background: #fde2e2; color: #900; padding: 0.5em 1em; }
details.episode { border: 1px solid #ddd; margin: 0.4em 0; padding: 0.3em 0.6em; }
details.episode > summary { cursor: pointer; }
.check { font-size: 11px; padding: 0 4px; margin-left: 3px; border-radius: 3px; }
.check.pass { background: #d8f0de; } .check.fail { background: #f6d5d5; }
ol.turns { padding-left: 1.2em; }
li.turn { display: flex; gap: 1em; border-top: 1px dashed #e4e4e4; padding: 0.4em 0; }
li.turn .text { flex: 1 1 55%; min-width: 0; } li.turn .media { flex: 1 1 45%; }
.media { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; font-size: 10px; color: #555; }
figure.video img { margin-right: 2px; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0.1em 0 0.3em; background: #f8f8f8; padding: 2px 4px; }
.status.ok { color: #1d6b34; } .status.error, .problems { color: #a11; }
.status.defect, figure .defects { color: #b35900; font-weight: bold; }
div.reflection { border-left: 3px solid #6a5acd; padding-left: 4px; }
figure.defective img { outline: 3px solid #e08a00; } figure .content { color: #333; max-width: 260px; }
.n { color: #888; font-size: 11px; }
.request { font-style: italic; }
span.run, th.run { font-weight: bold; white-space: nowrap; }
span.run { background: #e8eefc; border-radius: 3px; padding: 0 4px; }
section.task > h3 { font-size: 13px; margin: 1em 0 0.2em; }
</style>
</head>
<body>
<h1>$title</h1>
<p>$headline</p>
<p id="broken-images" hidden></p>
$preface
<nav><a href="#scores">VisGenBench scores</a> · <a href="#metrics">objective metrics</a> ·
<a href="#rewards">reward components</a> · <a href="#trajectories">trajectories</a></nav>
<h2 id="scores">VisGenBench scores</h2>
$scores
<p class="note">$o_note</p>
<h2 id="metrics">Objective metrics</h2>
$metrics
<p class="note">Pass rates of the result checks over the episodes where they apply (n/a: none applies);
reward is the mean episode return; failed calls is the share of tool calls that failed.</p>
<h2 id="rewards">Reward components</h2>
$charts
<h2 id="trajectories">Trajectories</h2>
$viewer
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (image) { return !(image.complete && image.naturalWidth > 0); });
  document.body.setAttribute("data-images-loaded", String(images.length - broken.length));
  document.body.setAttribute("data-images-broken", String(broken.length));
  if (broken.length) {
    var notice = document.getElementById("broken-images");
    notice.textContent = broken.length + " picture(s) did not load: keep the media/ folder next to report.html.";
    notice.hidden = false;
  }
});
</script>
</body>
</html>
""")
