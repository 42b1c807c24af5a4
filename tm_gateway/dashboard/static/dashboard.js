// Draws each <div data-chart="name"> of a page with Apache ECharts, from the JSON the server put in #tm-data.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("tm-data").textContent || "{}");
  var money = function (v) { return "$" + Number(v).toLocaleString(undefined, {maximumFractionDigits: 2}); };
  var pct = function (v) { return (100 * v).toFixed(1) + "%"; };
  var grid = {left: 56, right: 72, top: 36, bottom: 40, containLabel: true};
  var hourLabel = function (iso) { return iso.slice(5, 13).replace("T", " ") + "h"; };
  var hourOfDay = function (h) { return (h < 10 ? "0" : "") + h + ":00"; };
  var DAY = Array.from({length: 24}, function (_, h) { return h; });

  function unique(rows, key) {
    var seen = {}, out = [];
    rows.forEach(function (r) { if (!(r[key] in seen)) { seen[r[key]] = 1; out.push(r[key]); } });
    return out;
  }

  function heat(rows, xKey, yKey, vKey, xLabel, fmt, xs) {
    xs = xs || unique(rows, xKey).sort();
    var ys = unique(rows, yKey).sort();
    var xi = {}, yi = {}, max = 0;
    xs.forEach(function (x, i) { xi[x] = i; });
    ys.forEach(function (y, i) { yi[y] = i; });
    var cells = rows.map(function (r) {
      var v = r[vKey]; if (v !== null && v > max) { max = v; }
      return [xi[r[xKey]], yi[r[yKey]], v === null ? "-" : v];
    });
    return {
      tooltip: {position: "top", formatter: function (p) {
        return ys[p.value[1]] + "<br>" + xLabel(xs[p.value[0]]) + ": " + fmt(p.value[2]); }},
      grid: {left: 8, right: 24, top: 16, bottom: 64, containLabel: true},
      xAxis: {type: "category", data: xs.map(xLabel), splitArea: {show: true}},
      yAxis: {type: "category", data: ys, splitArea: {show: true}},
      visualMap: {min: 0, max: max || 1, calculable: true, orient: "horizontal", left: "center", bottom: 0,
                  itemHeight: 160, inRange: {color: ["#f4f8fb", "#9cc3e4", "#2f5d8a", "#15304d"]}},
      series: [{name: vKey, type: "heatmap", data: cells, emphasis: {itemStyle: {borderColor: "#333", borderWidth: 1}}}]
    };
  }

  function spendVsBaseline(rows, key, label, kind) {
    return {
      tooltip: {trigger: "axis", valueFormatter: money},
      legend: {data: ["spend", "all-frontier baseline"]},
      grid: grid,
      xAxis: {type: "category", data: rows.map(function (r) { return label(r[key]); })},
      yAxis: {type: "value", axisLabel: {formatter: money}},
      series: [
        {name: "spend", type: kind, data: rows.map(function (r) { return r.cost; }), itemStyle: {color: "#2f5d8a"},
         areaStyle: kind === "line" ? {opacity: 0.15} : undefined, showSymbol: false},
        {name: "all-frontier baseline", type: kind, data: rows.map(function (r) { return r.baseline; }),
         itemStyle: {color: "#c0392b"}, lineStyle: {type: "dashed"}, showSymbol: false}
      ]
    };
  }

  function stacked(rows, xKey, seriesKey, vKey, fmt) {
    var xs = unique(rows, xKey).sort(), names = unique(rows, seriesKey).sort();
    return {
      tooltip: {trigger: "axis", valueFormatter: fmt}, legend: {data: names}, grid: grid,
      xAxis: {type: "category", data: xs}, yAxis: {type: "value", axisLabel: {formatter: fmt}},
      series: names.map(function (n) {
        return {name: n, type: "bar", stack: "all", data: xs.map(function (x) {
          var hit = rows.find(function (r) { return r[xKey] === x && r[seriesKey] === n; });
          return hit ? hit[vKey] : 0; })};
      })
    };
  }

  var builders = {
    "spend-hour": function () { return spendVsBaseline(data.by_hour, "hour", hourLabel, "line"); },
    "spend-day": function () { return spendVsBaseline(data.by_day, "day", function (d) { return d; }, "bar"); },
    "cache-day": function () {
      return {tooltip: {trigger: "axis", valueFormatter: pct}, grid: grid,
              xAxis: {type: "category", data: data.by_day.map(function (d) { return d.day; })},
              yAxis: {type: "value", min: 0, axisLabel: {formatter: pct}},
              series: [{name: "cache hit rate", type: "line", data: data.by_day.map(function (d) {
                return d.requests ? d.cache_hits / d.requests : 0; })}]};
    },
    "tokens-agent": function () { return heat(data.tokens_by.agent, "hour", "name", "tokens", hourOfDay, Number, DAY); },
    "tokens-model": function () { return heat(data.tokens_by.model, "hour", "name", "tokens", hourOfDay, Number, DAY); },
    "rates-model": function () {
      var ms = data.models;
      return {tooltip: {trigger: "axis", valueFormatter: pct}, legend: {data: ["fallback rate", "error rate"]}, grid: grid,
              xAxis: {type: "category", data: ms.map(function (m) { return m.model; })},
              yAxis: {type: "value", axisLabel: {formatter: pct}},
              series: [
                {name: "fallback rate", type: "bar", data: ms.map(function (m) {
                  return {value: m.fallback_rate, itemStyle: {color: m.fallback_rate > data.fallback_alert_rate ? "#e67e22" : "#2f5d8a"}}; }),
                 markLine: {symbol: "none", lineStyle: {color: "#e67e22", type: "dashed"},
                            label: {formatter: "alert " + pct(data.fallback_alert_rate)},
                            data: [{yAxis: data.fallback_alert_rate}]}},
                {name: "error rate", type: "bar", itemStyle: {color: "#c0392b"},
                 data: ms.map(function (m) { return m.error_rate; })}
              ]};
    },
    "routes": function () {
      var rs = data.routes.slice(0, 15).reverse();
      return {tooltip: {trigger: "axis"}, grid: {left: 8, right: 32, top: 8, bottom: 24, containLabel: true},
              xAxis: {type: "value"}, yAxis: {type: "category", data: rs.map(function (r) { return r.route; })},
              series: [{name: "requests", type: "bar", data: rs.map(function (r) { return r.requests; }),
                        itemStyle: {color: "#2f5d8a"}}]};
    },
    "agents": function () {
      var as = data.agents;
      return {tooltip: {trigger: "axis"}, legend: {data: ["tokens", "spend"]}, grid: grid,
              xAxis: {type: "category", data: as.map(function (a) { return a.agent; })},
              yAxis: [{type: "value", name: "tokens"}, {type: "value", name: "spend", axisLabel: {formatter: money}}],
              series: [{name: "tokens", type: "bar", data: as.map(function (a) { return a.tokens; }), itemStyle: {color: "#2f5d8a"}},
                       {name: "spend", type: "bar", yAxisIndex: 1, data: as.map(function (a) { return a.cost; }),
                        itemStyle: {color: "#e67e22"}, tooltip: {valueFormatter: money}}]};
    },
    "cost-tier": function () { return stacked(data.cost_by_tier, "day", "tier", "cost", money); },
    "quality-trend": function () {
      var users = Object.keys(data.trend).sort(), days = [];
      users.forEach(function (u) { data.trend[u].forEach(function (p) { if (days.indexOf(p.day) < 0) { days.push(p.day); } }); });
      days.sort();
      return {tooltip: {trigger: "axis", valueFormatter: function (v) { return v === null ? "–" : Number(v).toFixed(2); }},
              legend: {type: "scroll", data: users}, grid: grid,
              xAxis: {type: "category", data: days}, yAxis: {type: "value", min: 0, max: 1},
              series: users.map(function (u) {
                var by = {}; data.trend[u].forEach(function (p) { by[p.day] = p.quality; });
                return {name: u, type: "line", connectNulls: true, data: days.map(function (d) { return d in by ? by[d] : null; })};
              })};
    },
    "quality-heat": function () {
      var opt = heat(data.quality_heat, "model", "task_type", "avg_quality", function (m) { return m; },
                     function (v) { return v === "-" ? "–" : Number(v).toFixed(2); });
      opt.visualMap.min = 0; opt.visualMap.max = 1;
      opt.visualMap.inRange = {color: ["#c0392b", "#f1c40f", "#1f7a4d"]};
      opt.series[0].label = {show: true, formatter: function (p) { return p.value[2] === "-" ? "" : Number(p.value[2]).toFixed(2); }};
      return opt;
    },
    "rules-history": function () { return stacked(data.events, "day", "event", "n", Number); }
  };

  var charts = [];
  document.querySelectorAll("[data-chart]").forEach(function (el) {
    var build = builders[el.dataset.chart];
    if (!build) { console.error("no chart named " + el.dataset.chart); return; }
    var chart = echarts.init(el, null, {renderer: "canvas"});
    chart.setOption(build());
    charts.push(chart);
    el.dataset.rendered = "true";
  });
  window.addEventListener("resize", function () { charts.forEach(function (c) { c.resize(); }); });
})();
